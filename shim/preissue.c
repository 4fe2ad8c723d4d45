/*
 * preissue.c: the pools of pre-issued sockets and their refill (see
 * preissue.h).
 *
 * A refill keeps one socket for its caller and pools the rest. The failure
 * count and the hold-off deadline (monotonic clock) are per family, as a
 * host without IPv6 refuses only AF_INET6, and are read and written
 * without a lock: threads racing on them at worst ask the broker once more.
 */
#include "preissue.h"

#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "broker_conn.h"
#include "fdpool.h"
#include "graft_wire.h"
#include "log.h"
#include "real.h"

_Static_assert(FDPOOL_SLOTS >= GRAFT_PREISSUE_MAX - 1, "a full refill fits an empty pool");

#define HOLDOFF_FIRST_NS 1000000000LL /* 1 s */
/*
 * Up to 64 s: a broker that keeps refusing (one without PREISSUE, or
 * without confinement) then sees, and audits, a refused request about
 * once a minute per process rather than every second.
 */
#define HOLDOFF_MAX_DOUBLINGS 6

/*
 * A refill mark older than this belongs to a refill that never ended: its
 * thread left it by siglongjmp or pthread_exit from a signal handler. A
 * round trip takes at most two broker timeouts (one retry).
 */
#define REFILL_STALE_NS (2 * (BROKER_TIMEOUT_SEC + 1) * 1000000000LL)

struct family_pool {
    int family;
    const char *name; /* for messages */
    struct fdpool fds;
    _Atomic pid_t refiller;       /* the process refilling, 0 for none */
    _Atomic int64_t refill_since; /* monotonic ns, when it began */
    atomic_uint failures;         /* since a pre-issued socket of the family last connected */
    _Atomic int64_t refill_after; /* monotonic ns */
};

/* Bumped by each flush after a refusal (preissue_refused). */
static atomic_uint generation;

/* Indexed by family == AF_INET6. */
static struct family_pool pools[] = {[0] = {.family = AF_INET, .name = "tcp"},
                                     [1] = {.family = AF_INET6, .name = "tcp6"}};

#define N_POOLS (sizeof pools / sizeof pools[0])

static struct family_pool *pool_of(int family)
{
    return &pools[family == AF_INET6];
}

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void preissue_init(void)
{
    for (size_t i = 0; i < N_POOLS; i++)
        fdpool_init(&pools[i].fds);
}

/* repeats: failures in a row before this one; each doubles the wait. */
static void hold_off(struct family_pool *p, unsigned int repeats, const char *why)
{
    int64_t delay = HOLDOFF_FIRST_NS
                    << (repeats < HOLDOFF_MAX_DOUBLINGS ? repeats : HOLDOFF_MAX_DOUBLINGS);
    atomic_store(&p->refill_after, monotonic_ns() + delay);
    log_debug("preissue %s: %s; connects ask the broker for %lld s", p->name, why,
              (long long)(delay / 1000000000LL));
}

/*
 * One refill per family at a time: a thread that finds the pool empty while
 * another refills takes the slow path, one round trip like a refill of its
 * own, rather than fetching a batch that would mostly not fit the pool.
 * The refiller is recorded by pid, so that in a fork child, where the
 * refilling thread does not exist, the mark is stale and ignored.
 */
static bool begin_refill(struct family_pool *p, int64_t now)
{
    pid_t me = getpid();
    pid_t current = atomic_load(&p->refiller);
    if (current == me && now - atomic_load(&p->refill_since) < REFILL_STALE_NS)
        return false;
    if (!atomic_compare_exchange_strong(&p->refiller, &current, me))
        return false;
    atomic_store(&p->refill_since, now);
    return true;
}

/* A socket for the caller, the rest pooled; -1, and *unreachable set if the broker cannot be reached. */
static int refill(struct family_pool *p, int protocol, int *unreachable, struct forkguard *g)
{
    int64_t now = monotonic_ns();
    if (now < atomic_load(&p->refill_after) || !begin_refill(p, now))
        return -1;
    int fds[GRAFT_PREISSUE_MAX], nfds, refused;
    int err = broker_preissue(p->family, protocol, fds, &nfds, &refused, g);
    atomic_store(&p->refiller, 0);
    if (err != 0 || refused != 0) {
        hold_off(p, atomic_fetch_add(&p->failures, 1), broker_strerror(err != 0 ? err : refused));
        *unreachable = err;
        return -1;
    }
    for (int i = 1; i < nfds; i++)
        if (!fdpool_add(&p->fds, fds[i]))
            graft_real.close(fds[i]);
    log_debug("preissue %s: %d sockets", p->name, nfds);
    return fds[0];
}

struct preissued preissue_take(int family, int protocol, struct forkguard *g)
{
    struct family_pool *p = pool_of(family);
    struct preissued out = {.fd = -1, .gen = atomic_load(&generation), .unreachable = 0};
    if (!fdpool_owned(&p->fds))
        return out;
    out.fd = fdpool_pop(&p->fds);
    if (out.fd < 0)
        out.fd = refill(p, protocol, &out.unreachable, g);
    return out;
}

void preissue_connected(int family)
{
    struct family_pool *p = pool_of(family);
    if (atomic_load_explicit(&p->failures, memory_order_relaxed) != 0)
        atomic_store_explicit(&p->failures, 0, memory_order_relaxed);
}

void preissue_refused(int family, unsigned int gen)
{
    if (!atomic_compare_exchange_strong(&generation, &gen, gen + 1))
        return;
    for (size_t i = 0; i < N_POOLS; i++)
        fdpool_flush(&pools[i].fds);
    struct family_pool *p = pool_of(family);
    unsigned int before = atomic_fetch_add(&p->failures, 1);
    if (before > 0)
        hold_off(p, before - 1, "the kernel refused pre-issued sockets again");
}
