/* ipc_floor: the least a broker round trip can cost on this machine, for bench/ipc_floor.py.
 *
 *   ipc_floor server UNIX_PATH
 *       a broker reduced to its system calls: listens on UNIX_PATH
 *       (SOCK_SEQPACKET), accepts one client, and for each 64-byte request
 *       opens a TCP socket, starts a non-blocking connect to 127.0.0.1:PORT
 *       (PORT from the request's first two bytes, network order) and sends
 *       the socket back with SCM_RIGHTS in a 16-byte reply. No policy, no
 *       audit, no event loop: what any broker, in any language, pays at least.
 *   ipc_floor client UNIX_PATH COUNT SPIN
 *       listens on 127.0.0.1:0 itself, then COUNT times, alternating:
 *       a native socket()+connect() [timed], and a round trip to the server
 *       [timed: send the request, receive the connected socket]. SPIN=1 waits
 *       for the reply with non-blocking recvmsg + sched_yield instead of
 *       sleeping in recvmsg. Prints one JSON object with p50/p99 of both.
 *
 * Every loop is bounded by COUNT; the client drains its listener every 200
 * cycles and closes with SO_LINGER{1,0}, so nothing piles up.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define REQ_SIZE 64
#define REP_SIZE 16

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int unix_addr(const char *path, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa->sun_path)
        return -1;
    strcpy(sa->sun_path, path);
    return 0;
}

static int send_fd(int conn, int fd)
{
    char rep[REP_SIZE] = {0};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    struct iovec iov = {.iov_base = rep, .iov_len = sizeof rep};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(conn, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof rep ? 0 : -1;
}

static int server(const char *path)
{
    struct sockaddr_un sa;
    if (unix_addr(path, &sa) < 0) {
        fprintf(stderr, "path too long\n");
        return 1;
    }
    int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 8) < 0) {
        perror("server: listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    int conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (conn < 0) {
        perror("server: accept");
        return 1;
    }
    char req[REQ_SIZE];
    ssize_t n;
    while ((n = recv(conn, req, sizeof req, 0)) == REQ_SIZE) {
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        memcpy(&to.sin_port, req, sizeof to.sin_port);
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s < 0)
            return 1;
        if (connect(s, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS)
            return 1;
        int err = send_fd(conn, s);
        close(s);
        if (err < 0)
            return 1;
    }
    return n == 0 ? 0 : 1; /* the client's close ends the run */
}

static int recv_fd(int conn, int spin)
{
    char rep[REP_SIZE];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    for (;;) {
        struct iovec iov = {.iov_base = rep, .iov_len = sizeof rep};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                             .msg_controllen = sizeof ctl.buf};
        ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC | (spin ? MSG_DONTWAIT : 0));
        if (n < 0 && spin && errno == EAGAIN) {
            sched_yield(); /* a server on this CPU gets to run */
            continue;
        }
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        if (n != REP_SIZE || c == NULL || c->cmsg_type != SCM_RIGHTS)
            return -1;
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        return fd;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, int n, double p)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return v[(int)(p * (n - 1))];
}

static void close_now(int fd)
{
    struct linger lg = {1, 0}; /* RST: no TIME_WAIT build-up */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static int client(const char *path, int count, int spin)
{
    struct sockaddr_un su;
    struct sockaddr_in lsa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof lsa;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&lsa, sizeof lsa) < 0 || listen(ls, 4096) < 0 ||
        getsockname(ls, (struct sockaddr *)&lsa, &len) < 0) {
        perror("client: listen");
        return 1;
    }
    int conn = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (unix_addr(path, &su) < 0 || conn < 0 || connect(conn, (struct sockaddr *)&su, sizeof su) < 0) {
        perror("client: connect to server");
        return 1;
    }
    double *native = calloc((size_t)count, sizeof *native), *rt = calloc((size_t)count, sizeof *rt);
    if (native == NULL || rt == NULL)
        return 1;
    char req[REQ_SIZE] = {0};
    memcpy(req, &lsa.sin_port, sizeof lsa.sin_port);
    for (int i = 0; i < count; i++) {
        double t0 = now_us();
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&lsa, sizeof lsa) < 0) {
            perror("client: native connect");
            return 1;
        }
        native[i] = now_us() - t0;
        close_now(s);
        t0 = now_us();
        if (send(conn, req, sizeof req, MSG_NOSIGNAL) != (ssize_t)sizeof req || (s = recv_fd(conn, spin)) < 0) {
            fprintf(stderr, "client: round trip failed\n");
            return 1;
        }
        rt[i] = now_us() - t0;
        close_now(s);
        if (i % 200 == 199)
            for (int c; (c = accept4(ls, NULL, NULL, SOCK_CLOEXEC)) >= 0;)
                close(c);
    }
    printf("{\"native_p50\": %.2f, \"native_p99\": %.2f, \"rt_p50\": %.2f, \"rt_p99\": %.2f}\n",
           pct(native, count, 0.5), pct(native, count, 0.99), pct(rt, count, 0.5), pct(rt, count, 0.99));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "server") == 0)
        return server(argv[2]);
    if (argc == 5 && strcmp(argv[1], "client") == 0)
        return client(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: ipc_floor server UNIX_PATH | ipc_floor client UNIX_PATH COUNT SPIN\n");
    return 2;
}
