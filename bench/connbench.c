/* connbench: the cost of a TCP connect(), for bench/run.py and bench/broker_load.py.
 *
 *   connbench server ADDR PORT
 *       listens on ADDR:PORT (backlog 4096), prints "ready PORT" once listening,
 *       then accepts and closes connections until stdin reaches EOF or it is killed.
 *   connbench client ADDR PORT COUNT PROCS [WARMUP [eof]]
 *       PROCS processes (fork), each doing COUNT/PROCS cycles of
 *       socket(); connect() [timed]; SO_LINGER{1,0}; close(),
 *       after WARMUP untimed cycles each. All start together (a pipe barrier).
 *       With "eof", the timed part runs on until read() returns 0: the
 *       server's close has arrived, so the connection reached the server even
 *       through a forwarder (pasta) that completes the client's handshake
 *       itself and connects onward afterwards.
 *       Prints one JSON object: count, errors, elapsed_s, rate (cycles/s over
 *       the whole run, all processes), p50_us, p90_us, p99_us, max_us of connect().
 *
 * SO_LINGER{1,0} makes close() send RST, so no TIME_WAIT piles up and a long
 * run never runs out of ephemeral ports; it is set after connect() so it goes
 * to the real (possibly grafted) socket. Loops are bounded by COUNT; a failed
 * connect is counted and stops that process after 100 failures.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_addr(const char *addr, const char *port, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)atoi(port));
    return inet_pton(AF_INET, addr, &sa->sin_addr) == 1 ? 0 : -1;
}

static int server(const struct sockaddr_in *sa) {
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) { perror("socket"); return 1; }
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(ls, (const struct sockaddr *)sa, sizeof(*sa)) < 0) { perror("bind"); return 1; }
    if (listen(ls, 4096) < 0) { perror("listen"); return 1; }
    struct sockaddr_in got;
    socklen_t len = sizeof(got);
    getsockname(ls, (struct sockaddr *)&got, &len);
    printf("ready %d\n", ntohs(got.sin_port));
    fflush(stdout);
    struct pollfd pf[2] = {{.fd = ls, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR) continue;
            perror("poll");
            return 1;
        }
        if (pf[1].revents) return 0; /* stdin closed: the harness is done with us */
        if (pf[0].revents & POLLIN) {
            for (int i = 0; i < 64; i++) { /* drain a bounded batch */
                int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (c < 0) break;
                close(c);
            }
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static int until_eof; /* the "eof" argument */

/* One cycle; returns connect() latency in seconds (until the server's close with
 * until_eof), or -1 with errno. */
static double cycle(const struct sockaddr_in *sa) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    double t0 = now_s();
    int r = connect(s, (const struct sockaddr *)sa, sizeof(*sa));
    if (r == 0 && until_eof) {
        char b;
        ssize_t n;
        while ((n = read(s, &b, 1)) < 0 && errno == EINTR) {}
        if (n != 0) { /* data or an error (a reset) instead of the server's close */
            r = -1;
            if (n > 0) errno = EPROTO;
        }
    }
    double t1 = now_s();
    if (r < 0) {
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(s);
    return t1 - t0;
}

static int client(const struct sockaddr_in *sa, long count, int procs, long warmup) {
    if (procs < 1 || procs > 1024 || count < procs) {
        fprintf(stderr, "connbench: need 1 <= PROCS <= 1024 and COUNT >= PROCS\n");
        return 2;
    }
    long per = count / procs;
    size_t lat_bytes = sizeof(double) * (size_t)per * (size_t)procs;
    /* shared: latencies, per-process error counts and first errno, start and end times */
    double *lat = mmap(NULL, lat_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    long *meta = mmap(NULL, sizeof(long) * 3 * (size_t)procs, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (lat == MAP_FAILED || meta == MAP_FAILED) { perror("mmap"); return 1; }
    int go[2], ready[2];
    if (pipe(go) < 0 || pipe(ready) < 0) { perror("pipe"); return 1; }
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            close(go[1]);
            close(ready[0]);
            for (long i = 0; i < warmup; i++) cycle(sa);
            char b = 'r';
            if (write(ready[1], &b, 1) != 1) _exit(1);
            if (read(go[0], &b, 1) < 0) _exit(1); /* EOF when the parent says go */
            double *mine = lat + (size_t)p * (size_t)per;
            long errs = 0, first_errno = 0, done = 0;
            for (long i = 0; i < per && errs < 100; i++) {
                double t = cycle(sa);
                if (t < 0) {
                    if (!first_errno) first_errno = errno;
                    errs++;
                    continue;
                }
                mine[done++] = t;
            }
            meta[3 * p] = done;
            meta[3 * p + 1] = errs;
            meta[3 * p + 2] = first_errno;
            _exit(0);
        }
    }
    close(go[0]);
    close(ready[1]);
    char b;
    for (int p = 0; p < procs; p++)
        if (read(ready[0], &b, 1) != 1) { fprintf(stderr, "connbench: a worker died in warm-up\n"); break; }
    double t0 = now_s();
    close(go[1]); /* go */
    int status, failed = 0;
    for (int p = 0; p < procs; p++) {
        if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) failed++;
    }
    double elapsed = now_s() - t0;
    /* compact the samples */
    long n = 0, errs = 0, first_errno = 0;
    for (int p = 0; p < procs; p++) {
        double *src = lat + (size_t)p * (size_t)per;
        for (long i = 0; i < meta[3 * p]; i++) lat[n++] = src[i];
        errs += meta[3 * p + 1];
        if (!first_errno) first_errno = meta[3 * p + 2];
    }
    qsort(lat, (size_t)n, sizeof(double), cmp_double);
    printf("{\"count\": %ld, \"errors\": %ld, \"first_errno\": %ld, \"failed_procs\": %d, \"procs\": %d, "
           "\"elapsed_s\": %.6f, \"rate\": %.1f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, "
           "\"max_us\": %.2f}\n",
           n, errs, first_errno, failed, procs, elapsed, elapsed > 0 ? (double)n / elapsed : 0.0,
           pct(lat, n, 50) * 1e6, pct(lat, n, 90) * 1e6, pct(lat, n, 99) * 1e6, n ? lat[n - 1] * 1e6 : 0.0);
    return (errs || failed || n == 0) ? 1 : 0;
}

int main(int argc, char **argv) {
    struct sockaddr_in sa;
    signal(SIGPIPE, SIG_IGN);
    if (argc == 4 && strcmp(argv[1], "server") == 0) {
        if (parse_addr(argv[2], argv[3], &sa) < 0) { fprintf(stderr, "bad address\n"); return 2; }
        return server(&sa);
    }
    if ((argc >= 6 && argc <= 8) && strcmp(argv[1], "client") == 0) {
        if (parse_addr(argv[2], argv[3], &sa) < 0) { fprintf(stderr, "bad address\n"); return 2; }
        if (argc == 8 && strcmp(argv[7], "eof") != 0) { fprintf(stderr, "connbench: the 7th argument can only be eof\n"); return 2; }
        until_eof = argc == 8;
        return client(&sa, atol(argv[4]), atoi(argv[5]), argc == 7 ? atol(argv[6]) : 50);
    }
    fprintf(stderr, "usage: connbench server ADDR PORT | connbench client ADDR PORT COUNT PROCS [WARMUP [eof]]\n");
    return 2;
}
