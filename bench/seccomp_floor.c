/*
 * The floor under a seccomp-mode connect: one user-notification round trip with nothing in it.
 *
 *   seccomp_floor COUNT AGENT_CPU APP_CPU SYNC
 *
 * A forked "app" installs a filter that stops getppid() for its supervisor
 * (SECCOMP_RET_USER_NOTIF) and hands the notify fd to the parent, the
 * "agent", which answers every call as graft's C loop answers a connect it
 * lets go on: poll, SECCOMP_IOCTL_NOTIF_RECV, SECCOMP_IOCTL_NOTIF_SEND with
 * SECCOMP_USER_NOTIF_FLAG_CONTINUE, and nothing else. SYNC 1 asks for
 * synchronous wake-ups (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6), as
 * the broker's loop does. The app times COUNT stopped getppid()s and,
 * interleaved, COUNT getpid()s the filter lets through, and prints one JSON
 * line: p50/p99 of each in microseconds. Run by bench/seccomp_floor.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void pin(int cpu) { /* a negative cpu: where the scheduler puts it */
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0)
        die("sched_setaffinity");
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, int n, double p) {
    qsort(v, (size_t)n, sizeof *v, cmp);
    return v[(int)(p * (n - 1))];
}

static void send_fd(int sock, int fd) {
    char byte = 0, buf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&byte, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &m, 0) < 0)
        die("sendmsg");
}

static int recv_fd(int sock) {
    char byte, buf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&byte, 1};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof buf};
    if (recvmsg(sock, &m, 0) <= 0)
        die("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (c == NULL || c->cmsg_type != SCM_RIGHTS)
        die("no fd");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void app(int sock, int count, int cpu) {
    pin(cpu);
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("no_new_privs");
    int fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (fd < 0)
        die("seccomp");
    send_fd(sock, fd);
    close(fd);
    double *stopped = malloc(sizeof(double) * (size_t)count), *plain = malloc(sizeof(double) * (size_t)count);
    if (stopped == NULL || plain == NULL)
        die("malloc");
    for (int i = 0; i < count; i++) {
        double t0 = now_us();
        syscall(SYS_getppid);
        double t1 = now_us();
        syscall(SYS_getpid);
        double t2 = now_us();
        stopped[i] = t1 - t0;
        plain[i] = t2 - t1;
    }
    printf("{\"count\": %d, \"stopped_p50_us\": %.2f, \"stopped_p99_us\": %.2f, \"plain_p50_us\": %.2f, "
           "\"plain_p99_us\": %.2f}\n",
           count, pct(stopped, count, 0.5), pct(stopped, count, 0.99), pct(plain, count, 0.5),
           pct(plain, count, 0.99));
    fflush(stdout);
    exit(0);
}

static void agent(int fd, int sync) {
    if (sync) {
        uint64_t flags = SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP;
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags) < 0)
            die("SECCOMP_IOCTL_NOTIF_SET_FLAGS");
    }
    struct seccomp_notif req;
    struct seccomp_notif_resp resp;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    for (;;) { /* ends when the app exits: the notify fd hangs up */
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (!(p.revents & POLLIN))
            return;
        memset(&req, 0, sizeof req);
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) {
            if (errno == EINTR || errno == ENOENT)
                continue;
            die("RECV");
        }
        resp = (struct seccomp_notif_resp){.id = req.id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
        if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) < 0 && errno != ENOENT)
            die("SEND");
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s COUNT AGENT_CPU APP_CPU SYNC\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[1]), agent_cpu = atoi(argv[2]), app_cpu = atoi(argv[3]), sync = atoi(argv[4]);
    if (count < 1)
        return 2;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        die("socketpair");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        close(sv[0]);
        app(sv[1], count, app_cpu);
    }
    close(sv[1]);
    pin(agent_cpu);
    int fd = recv_fd(sv[0]);
    close(sv[0]);
    agent(fd, sync);
    close(fd);
    int status;
    if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return 1;
    return 0;
}
