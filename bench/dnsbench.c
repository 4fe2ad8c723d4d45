/* dnsbench: DNS lookup round trips over UDP, for bench/dns_lookup.py.
 *
 *   dnsbench ADDR PORT NAME COUNT WARMUP TIMEOUT_MS [TAG]
 *
 * Asks ADDR:PORT for NAME's A record, one query at a time: WARMUP untimed
 * queries, then COUNT timed ones, each timed from just before send() to the
 * answer's recv() (CLOCK_MONOTONIC). With TAG, every query asks a name of
 * its own, "TAG-<i>.NAME" (i counts the warm-up too), so a caching resolver
 * misses each time; without, the same NAME every time.
 *
 * The socket is connect()ed once, then only send() and recv(): under
 * libgraft.so the connect to the broker's resolver is judged once (the
 * program's own network), and the loop runs no code of the shim's, so the
 * client costs the same on both sides of the comparison.
 *
 * An answer counts if it has the query's id, QR, the query's question,
 * rcode NOERROR and at least one answer record; one with another id or
 * question (a late answer to a lost query) is skipped while the query's
 * deadline lasts. No answer by TIMEOUT_MS: the query is lost, counted, and
 * the next one is asked (at once if the port was unreachable); after
 * MAX_LOST lost queries the run stops early.
 * A wrong answer (the right id and question, but an error or no record) is
 * counted as bad. Loops are bounded by COUNT, WARMUP and the deadlines.
 *
 * Prints one JSON object: count, answered, lost, bad, stopped (1 if it gave
 * up early), elapsed_s, and samples_us (every answered timed query's round
 * trip, in order).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_LOST 20
#define MAX_NAME 253
#define HEADER 12

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The wire form of a standard recursive A query for name under id; its length, or -1. */
static int encode_query(unsigned char *buf, size_t cap, const char *name, uint16_t id) {
    size_t n = strlen(name);
    if (n == 0 || n > MAX_NAME || HEADER + n + 2 + 4 > cap) return -1;
    memset(buf, 0, HEADER);
    buf[0] = (unsigned char)(id >> 8);
    buf[1] = (unsigned char)id;
    buf[2] = 0x01; /* RD */
    buf[5] = 1;    /* one question */
    size_t pos = HEADER;
    const char *label = name;
    for (;;) {
        const char *dot = strchr(label, '.');
        size_t len = dot ? (size_t)(dot - label) : strlen(label);
        if (len == 0 || len > 63) return -1;
        buf[pos++] = (unsigned char)len;
        memcpy(buf + pos, label, len);
        pos += len;
        if (!dot) break;
        label = dot + 1;
    }
    buf[pos++] = 0;
    buf[pos++] = 0, buf[pos++] = 1; /* type A */
    buf[pos++] = 0, buf[pos++] = 1; /* class IN */
    return (int)pos;
}

static void set_timeout(int s, uint64_t ns) {
    struct timeval tv = {.tv_sec = (time_t)(ns / 1000000000u), .tv_usec = (suseconds_t)(ns % 1000000000u / 1000)};
    if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1; /* 0 would mean "wait for ever" */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

enum outcome { ANSWERED, LOST, BAD };

/* One query and its answer; *rtt_ns is set when ANSWERED. */
static enum outcome ask(int s, const unsigned char *q, int qlen, uint64_t timeout_ns, uint64_t *rtt_ns) {
    unsigned char ans[4096];
    uint64_t start = now_ns(), deadline = start + timeout_ns;
    if (send(s, q, (size_t)qlen, 0) != qlen) return LOST;
    for (int skipped = 0;; skipped++) {
        ssize_t n = recv(s, ans, sizeof(ans), 0);
        uint64_t t = now_ns();
        if (n < 0) {
            if (errno == EINTR && t < deadline) continue;
            if (skipped) set_timeout(s, timeout_ns);
            return LOST; /* EAGAIN: the deadline passed; ECONNREFUSED: nothing listens there */
        }
        /* the question section, which echoes the query's, starts at HEADER in both */
        if (n >= qlen && ans[0] == q[0] && ans[1] == q[1] && (ans[2] & 0x80) &&
            memcmp(ans + HEADER, q + HEADER, (size_t)(qlen - HEADER)) == 0) {
            if (skipped) set_timeout(s, timeout_ns);
            int rcode = ans[3] & 0x0f, ancount = ans[6] << 8 | ans[7];
            if (rcode != 0 || ancount < 1) return BAD;
            *rtt_ns = t - start;
            return ANSWERED;
        }
        if (t >= deadline) { /* bounded: a stream of stray answers cannot hold a query for ever */
            set_timeout(s, timeout_ns);
            return LOST;
        }
        set_timeout(s, deadline - t); /* a stray answer: wait only for what is left of this one's time */
    }
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s ADDR PORT NAME COUNT WARMUP TIMEOUT_MS [TAG]\n", argv[0]);
        return 2;
    }
    const char *name = argv[3], *tag = argc == 8 ? argv[7] : NULL;
    long count = atol(argv[4]), warmup = atol(argv[5]), timeout_ms = atol(argv[6]);
    if (count < 1 || warmup < 0 || timeout_ms < 1) {
        fprintf(stderr, "COUNT >= 1, WARMUP >= 0, TIMEOUT_MS >= 1\n");
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000u;
    double *samples = calloc((size_t)count, sizeof(double));
    if (!samples) { perror("calloc"); return 1; }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { perror("socket"); return 1; }
    if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) { perror("connect"); return 1; }
    set_timeout(s, timeout_ns);

    unsigned char q[HEADER + MAX_NAME + 2 + 4];
    char qname[MAX_NAME + 2];
    int qlen = -1;
    long answered = 0, lost = 0, bad = 0, total = warmup + count;
    int stopped = 0;
    uint64_t began = 0;
    for (long i = 0; i < total; i++) {
        if (i == warmup) began = now_ns();
        uint16_t id = (uint16_t)(i * 40503u + 1); /* varies, so a late answer is told apart */
        if (tag) {
            snprintf(qname, sizeof(qname), "%s-%ld.%s", tag, i, name);
            qlen = encode_query(q, sizeof(q), qname, id);
        } else if (qlen < 0) {
            qlen = encode_query(q, sizeof(q), name, id);
        } else {
            q[0] = (unsigned char)(id >> 8), q[1] = (unsigned char)id;
        }
        if (qlen < 0) {
            fprintf(stderr, "cannot encode a query for %s\n", tag ? qname : name);
            return 2;
        }
        uint64_t rtt = 0;
        enum outcome o = ask(s, q, qlen, timeout_ns, &rtt);
        if (i < warmup) continue; /* the warm-up's answers are not counted */
        if (o == ANSWERED) samples[answered++] = (double)rtt / 1000.0;
        else if (o == BAD) bad++;
        else if (++lost >= MAX_LOST) {
            stopped = 1;
            break;
        }
    }
    double elapsed = began ? (double)(now_ns() - began) / 1e9 : 0.0;
    printf("{\"count\": %ld, \"answered\": %ld, \"lost\": %ld, \"bad\": %ld, \"stopped\": %d, \"elapsed_s\": %.6f, "
           "\"samples_us\": [",
           count, answered, lost, bad, stopped, elapsed);
    for (long i = 0; i < answered; i++) printf(i ? ",%.2f" : "%.2f", samples[i]);
    printf("]}\n");
    free(samples);
    close(s);
    return 0;
}
