/*
 * The kernel's records of fast-path connects, written as audit lines in C (graft_confine.h).
 *
 * The connect programs leave one struct graft_event per connect they let
 * through on a grant (confine/programs.py); core/grants.py drains the ring
 * on a timer. What a line says of a tenant or a rule is Python's: it passes
 * each grant id's tenant name and each rule id's name, already JSON; this
 * file only lays out the line exactly as audit.Record.to_json does
 * (tests/unit/test_kaudit.py compares them), so that a reader of the log
 * cannot tell which wrote it. A record Python must write itself (a grant id
 * it marked: an earlier broker's, or one whose grants may come from a
 * rule's `names`) stops the drain and is handed back, so order is kept.
 *
 * The ring's layout is the kernel's (kernel/bpf/ringbuf.c): each record
 * has an 8-byte header (u32 length with a BUSY and a DISCARD bit, u32 page
 * offset) and is padded to 8 bytes; the data area is mapped twice in a row,
 * so a record running past its end reads contiguously. Positions are read
 * with acquire loads and the consumer position written with a release
 * store, as libbpf's consumer does.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "graft_confine.h"
#include "graft_maps.h"

#define EXPORT __attribute__((visibility("default")))

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HDR 8

static const struct graft_kaudit_tenant *tenant_of(const struct graft_kaudit *k, uint32_t gid)
{
    uint32_t lo = 0, hi = k->n_tenants;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (k->tenants[mid].gid == gid)
            return &k->tenants[mid];
        if (k->tenants[mid].gid < gid)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* "2026-12-07T03:12:00.123456+00:00": datetime.now(UTC).isoformat(timespec="microseconds"). */
static void timestamp(char out[96])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(out, 96, "%04d-%02d-%02dT%02d:%02d:%02d.%06ld+00:00", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (long)(ts.tv_nsec / 1000) % 1000000);
}

/*
 * A line is laid out piece by piece rather than by snprintf: a drain writes
 * tens of thousands a second, and printf's format parsing (with an
 * inet_ntop that itself prints each IPv4 byte with a format) was most of
 * their cost in the broker's profile.
 */
struct line {
    char *at, *end;
    int overflow;
};

static void put(struct line *l, const char *s, size_t n)
{
    if (l->overflow || (size_t)(l->end - l->at) < n) {
        l->overflow = 1;
        return;
    }
    memcpy(l->at, s, n);
    l->at += n;
}

#define PUT_LITERAL(l, s) put((l), (s), sizeof(s) - 1)

static void put_string(struct line *l, const char *s)
{
    put(l, s, strlen(s));
}

static void put_unsigned(struct line *l, unsigned long v)
{
    char digits[20];
    size_t i = sizeof digits;
    do
        digits[--i] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    put(l, digits + i, sizeof digits - i);
}

/* The destination as Python's str() of its ipaddress: dotted quad, or inet_ntop's IPv6 form. */
static void put_addr(struct line *l, const struct graft_event *ev)
{
    if (ev->family == AF_INET) {
        for (int i = 0; i < 4; i++) {
            if (i > 0)
                PUT_LITERAL(l, ".");
            put_unsigned(l, ev->addr[i]);
        }
        return;
    }
    char addr[INET6_ADDRSTRLEN];
    if (inet_ntop(AF_INET6, ev->addr, addr, sizeof addr))
        put_string(l, addr);
}

/* One line for ev, written at ts, into out (room bytes): its length, or 0 if it does not fit. */
static size_t format(const struct graft_kaudit *k, const struct graft_kaudit_tenant *t,
                     const struct graft_event *ev, const char *ts, char *out, size_t room)
{
    struct line l = {out, out + room, 0};
    PUT_LITERAL(&l, "{\"ts\":\"");
    put_string(&l, ts);
    PUT_LITERAL(&l, "\",\"tenant\":");
    put_string(&l, t->name);
    PUT_LITERAL(&l, ",\"pid\":");
    put_unsigned(&l, ev->pid);
    PUT_LITERAL(&l, ",\"uid\":");
    put_unsigned(&l, ev->uid);
    PUT_LITERAL(&l, ",\"op\":\"connect\",\"proto\":\"tcp\",\"family\":");
    if (ev->family == AF_INET)
        PUT_LITERAL(&l, "\"inet\"");
    else
        PUT_LITERAL(&l, "\"inet6\"");
    PUT_LITERAL(&l, ",\"addr\":\"");
    put_addr(&l, ev); /* the programs write only AF_INET and AF_INET6 */
    PUT_LITERAL(&l, "\",\"port\":");
    put_unsigned(&l, (unsigned)ev->port[0] << 8 | ev->port[1]);
    PUT_LITERAL(&l, ",\"host_addr\":null,\"action\":\"graft\",\"rule\":");
    put_string(&l, ev->rule < k->n_rules ? k->rules[ev->rule] : "null");
    PUT_LITERAL(&l, ",\"errno\":0,\"confinement\":");
    put_string(&l, k->confinement);
    PUT_LITERAL(&l, ",\"via\":\"kernel\"}\n");
    /* One byte to spare, as snprintf's terminating NUL needed: a line fits as it did. */
    return l.overflow || l.at == l.end ? 0 : (size_t)(l.at - out);
}

EXPORT size_t graft_kaudit_drain(struct graft_kaudit *k, char *out, size_t cap, uint32_t *lines, int *stop,
                                 void *held)
{
    uint64_t cons = __atomic_load_n(k->consumer, __ATOMIC_ACQUIRE);
    uint64_t prod = __atomic_load_n(k->producer, __ATOMIC_ACQUIRE);
    size_t used = 0;
    /*
     * An audit line's ts is when it is written. The lines of one call are
     * written together (a call formats a few hundred, in well under a
     * millisecond), so they share one: the clock and the calendar once a
     * call, not once a line.
     */
    char ts[96];
    timestamp(ts);

    *lines = 0;
    *stop = GRAFT_KAUDIT_EMPTY;
    while (cons < prod) {
        const uint8_t *at = k->data + (cons & k->mask);
        uint32_t word = __atomic_load_n((const uint32_t *)at, __ATOMIC_ACQUIRE);
        if (word & RB_BUSY)
            break; /* reserved, not committed yet: the rest waits for the next drain */
        uint32_t length = word & ~(RB_BUSY | RB_DISCARD);
        uint64_t next = cons + ((length + RB_HDR + 7) & ~7u);
        if (!(word & RB_DISCARD) && length >= sizeof(struct graft_event)) {
            struct graft_event ev;
            memcpy(&ev, at + RB_HDR, sizeof ev);
            struct graft_kaudit_tenant *t = (struct graft_kaudit_tenant *)tenant_of(k, ev.tenant);
            if (t == NULL || t->to_python || (ev.family != AF_INET && ev.family != AF_INET6)) {
                memcpy(held, &ev, sizeof ev);
                cons = next;
                *stop = GRAFT_KAUDIT_HELD;
                break;
            }
            size_t n = format(k, t, &ev, ts, out + used, cap - used);
            if (n == 0) {
                *stop = GRAFT_KAUDIT_FULL;
                break;
            }
            used += n;
            t->written++;
            (*lines)++;
        }
        cons = next;
    }
    __atomic_store_n(k->consumer, cons, __ATOMIC_RELEASE);
    return used;
}
