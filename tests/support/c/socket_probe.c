/*
 * socket_probe: plain BSD-socket client and server calls, one per mode, for
 * checking a libc's programs under the shim (tests/e2e/test_musl_preload.py
 * builds it with musl-gcc). It knows nothing of graft.
 *
 *   socket_probe tcp ADDR PORT     connect, send "tcp", print what comes back
 *   socket_probe udp ADDR PORT     sendto "udp" (unconnected), print the reply
 *   socket_probe fork ADDR PORT    fork; child, then parent, do "tcp" and print
 *   socket_probe serve PORT        bind 0.0.0.0:PORT, listen, print "listening",
 *                                  accept one client, send it "served", exit
 *
 * Every failure prints the call and errno to stderr and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void fail(const char *what)
{
    fprintf(stderr, "socket_probe[%d]: %s: %s\n", (int)getpid(), what, strerror(errno));
    exit(1);
}

static struct sockaddr_in address(const char *addr, const char *port)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) {
        errno = EINVAL;
        fail("inet_pton");
    }
    return sin;
}

/* One request and its echo over a new connection; the reply is printed with the pid's role. */
static void tcp(const char *role, const char *addr, const char *port)
{
    struct sockaddr_in sin = address(addr, port);
    char buf[256];
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket");
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0)
        fail("connect");
    if (send(fd, role, strlen(role), 0) < 0)
        fail("send");
    ssize_t n = recv(fd, buf, sizeof buf - 1, 0); /* the echo server answers in one segment here */
    if (n <= 0)
        fail("recv");
    buf[n] = '\0';
    printf("%s\n", buf);
    fflush(stdout);
    close(fd);
}

static void udp(const char *addr, const char *port)
{
    struct sockaddr_in sin = address(addr, port);
    char buf[256];
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        fail("socket");
    if (sendto(fd, "udp", 3, 0, (struct sockaddr *)&sin, sizeof sin) < 0)
        fail("sendto");
    ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
    if (n < 0)
        fail("recv");
    buf[n] = '\0';
    printf("%s\n", buf);
    close(fd);
}

static void serve(const char *port)
{
    struct sockaddr_in sin = address("0.0.0.0", port);
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        fail("setsockopt");
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0)
        fail("bind");
    if (listen(fd, 1) < 0)
        fail("listen");
    printf("listening\n");
    fflush(stdout); /* the test waits for this line before it connects */
    int client = accept(fd, NULL, NULL);
    if (client < 0)
        fail("accept");
    if (send(client, "served", 6, 0) < 0)
        fail("send");
    close(client);
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "tcp") == 0) {
        tcp("tcp", argv[2], argv[3]);
    } else if (argc == 4 && strcmp(argv[1], "udp") == 0) {
        udp(argv[2], argv[3]);
    } else if (argc == 4 && strcmp(argv[1], "fork") == 0) {
        pid_t child = fork();
        if (child < 0)
            fail("fork");
        if (child == 0) {
            tcp("child", argv[2], argv[3]);
            return 0;
        }
        int status;
        if (waitpid(child, &status, 0) < 0)
            fail("waitpid");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            return 1;
        tcp("parent", argv[2], argv[3]); /* after the child: the output's order is fixed */
    } else if (argc == 3 && strcmp(argv[1], "serve") == 0) {
        serve(argv[2]);
    } else {
        fprintf(stderr, "usage: socket_probe tcp|udp|fork ADDR PORT | serve PORT\n");
        return 2;
    }
    return 0;
}
