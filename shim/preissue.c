/*
 * preissue.c: the pools of pre-issued sockets and their refill (see
 * preissue.h).
 *
 * A blocking refill keeps one socket for its caller and pools the rest; a
 * request sent ahead pools all it brings. The failure
 * count and the hold-off deadline (monotonic clock) are per family, as a
 * host without IPv6 refuses only AF_INET6, and are read and written
 * without a lock: threads racing on them at worst ask the broker once more.
 */
#include "preissue.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "broker_conn.h"
#include "fdpool.h"
#include "graft_wire.h"
#include "log.h"
#include "real.h"
#include "sigmask.h"


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

/*
 * A family's refill is one atomic word, the pid of the process it belongs
 * to and a state (so that in a fork child, where its threads and its
 * connection do not exist, it reads as IDLE):
 *
 *   IDLE        no refill;
 *   ASKING      a thread sends a request (ahead of need, or a blocking
 *               refill of an empty pool);
 *   PENDING     a request sent ahead is on its way, its connection in
 *               `pending` (lent from the connection pool: a fork child
 *               closes it); any thread may collect its reply;
 *   COLLECTING  a thread takes that reply (without waiting, or waiting for
 *               it when the pool has run dry).
 *
 * Every change is one compare-and-swap (``move``); `pending` is written
 * and read only by the thread whose move put the word in ASKING or
 * COLLECTING. A thread stuck in ASKING or COLLECTING (it left by
 * siglongjmp from a signal handler) is taken for gone after
 * REFILL_STALE_NS, and its connection, if any, stays lent until exit.
 */
enum refill_state { IDLE, ASKING, PENDING, COLLECTING };

/*
 * How many sockets a refill asks for adapts to how fast the process uses
 * them: doubled when the last batch lasted under FAST_NS, halved when it
 * lasted over SLOW_NS, between MIN_WANT and MAX_WANT. A request for one
 * more batch goes out ahead of need when the pool is down to one batch, so
 * a pool holds up to two and the reply has a whole batch of connects to
 * arrive in: at half a batch, a broker sharing the cores with a busy client
 * and server was late often enough to set the connect p99 (a dry pool's
 * wait, and at several processes a core, the scheduler's whole round;
 * docs/benchmarks.md). A process that connects once a second holds a few
 * sockets; one that connects thousands of times a second asks for full
 * batches, well before it runs out.
 */
#define START_WANT 4
#define MIN_WANT 2
#define MAX_WANT GRAFT_PREISSUE_MAX
#define FAST_NS 250000000LL   /* 250 ms */
#define SLOW_NS 2000000000LL  /* 2 s */
#define BUSY_PAUSE_NS 20000000LL /* 20 ms: no refill after the tenant's limits refused one */
_Static_assert(2 * MAX_WANT <= FDPOOL_SLOTS, "a batch asked for at one batch left fits the pool");

struct family_pool {
    int family;
    const char *name; /* for messages */
    struct fdpool fds;
    _Atomic uint64_t refill;      /* pid << 32 | enum refill_state */
    _Atomic int64_t refill_since; /* monotonic ns, when ASKING or COLLECTING began */
    struct broker_pending pending;
    atomic_int want;              /* sockets one refill asks for */
    atomic_int got;               /* sockets the last batch brought: the broker may give fewer than want */
    _Atomic int64_t last_batch;   /* monotonic ns, when the last batch came */
    atomic_uint failures;         /* since a pre-issued socket of the family last connected */
    _Atomic int64_t refill_after; /* monotonic ns */
};

/* Bumped by each flush after a refusal (preissue_refused). */
static atomic_uint generation;

/* Indexed by family == AF_INET6. */
static struct family_pool pools[] = {
    [0] = {.family = AF_INET, .name = "tcp", .want = START_WANT, .got = START_WANT},
    [1] = {.family = AF_INET6, .name = "tcp6", .want = START_WANT, .got = START_WANT}};

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

static uint64_t word(pid_t pid, enum refill_state state)
{
    return (uint64_t)(uint32_t)pid << 32 | state;
}

/*
 * Moves p's refill from `from` to `to` for this process; whether it did.
 * From IDLE, a word of another process (a fork parent's) or of a thread
 * stuck past REFILL_STALE_NS counts as IDLE too.
 */
static bool move(struct family_pool *p, pid_t me, enum refill_state from, enum refill_state to)
{
    uint64_t w = atomic_load(&p->refill);
    if (from == IDLE) {
        enum refill_state state = (enum refill_state)(w & 0xffffffffu);
        bool busy = (pid_t)(w >> 32) == me && state != IDLE;
        if (busy && (state == PENDING || monotonic_ns() - atomic_load(&p->refill_since) < REFILL_STALE_NS))
            return false;
    } else if (w != word(me, from)) {
        return false;
    }
    if (!atomic_compare_exchange_strong(&p->refill, &w, word(me, to)))
        return false;
    if (to == ASKING || to == COLLECTING)
        atomic_store(&p->refill_since, monotonic_ns());
    return true;
}

static void set(struct family_pool *p, pid_t me, enum refill_state to)
{
    atomic_store(&p->refill, word(me, to)); /* only the thread that holds ASKING or COLLECTING calls it */
}

/*
 * The largest batch the process's fd limit leaves room for: the pools'
 * fds count against RLIMIT_NOFILE, and two families of two batches each
 * may take at most a quarter of it (from 1024, the common soft limit, up:
 * all of GRAFT_PREISSUE_MAX's 64; at 256, 16). Read at each batch, as a process
 * may raise or lower its limit whenever it likes.
 */
#define FD_LIMIT_SHARE 16 /* a batch is at most this fraction of RLIMIT_NOFILE */

static int fd_limit_want(void)
{
    int saved = errno;
    struct rlimit r;
    int got = getrlimit(RLIMIT_NOFILE, &r);
    errno = saved;
    if (got != 0 || r.rlim_cur / FD_LIMIT_SHARE >= (rlim_t)MAX_WANT) /* RLIM_INFINITY among them */
        return MAX_WANT;
    return r.rlim_cur / FD_LIMIT_SHARE < MIN_WANT ? MIN_WANT : (int)(r.rlim_cur / FD_LIMIT_SHARE);
}

/* A batch came: want follows how long the last one lasted, within what the fd limit leaves. */
static void adapt(struct family_pool *p)
{
    int64_t now = monotonic_ns(), lasted = now - atomic_exchange(&p->last_batch, now);
    int want = atomic_load(&p->want), most = fd_limit_want();
    if (want > most)
        atomic_store(&p->want, most);
    else if (lasted < FAST_NS && want < most)
        atomic_store(&p->want, want * 2 > most ? most : want * 2);
    else if (lasted > SLOW_NS && want > MIN_WANT)
        atomic_store(&p->want, want / 2 < MIN_WANT ? MIN_WANT : want / 2);
}

/* Sockets that came (all pooled; keep: one for the caller, returned) or a refusal; the other outcomes. */
static int settle_batch(struct family_pool *p, int err, int refused, int *fds, int nfds, bool keep, int *unreachable)
{
    if (err == 0 && (refused == ENOBUFS || refused == EAGAIN)) {
        /*
         * The tenant's pools are at their share of max_sockets, or it is at its max_rate: a passing
         * state of the tenant, not a broker that cannot serve. Smaller batches, and a short pause
         * (its connects ask the broker meanwhile), never the doubling hold-off.
         */
        atomic_store(&p->want, MIN_WANT);
        atomic_store(&p->refill_after, monotonic_ns() + BUSY_PAUSE_NS);
        return -1;
    }
    if (err != 0 || refused != 0) {
        hold_off(p, atomic_fetch_add(&p->failures, 1), broker_strerror(err != 0 ? err : refused));
        if (unreachable != NULL)
            *unreachable = err;
        return -1;
    }
    adapt(p);
    atomic_store(&p->got, nfds);
    for (int i = keep ? 1 : 0; i < nfds; i++)
        if (!fdpool_add(&p->fds, fds[i]))
            graft_real.close(fds[i]);
    log_debug("preissue %s: %d sockets", p->name, nfds);
    return keep ? fds[0] : -1;
}

/*
 * The pool is down to a batch: a request for one more goes out now, its
 * reply is collected by a later take. A batch is what the last one brought
 * when the broker gave less than asked (its share of the tenant's pools
 * among the processes that ask, core/poolshare.py): asking at `want` left
 * then held up to a batch more than that share, and the tenant's other
 * pools got the rest in scraps (batches of 7 at 8 processes) and ran dry.
 */
static void ask_ahead(struct family_pool *p, pid_t me, int protocol, struct forkguard *g)
{
    int want = atomic_load(&p->want), got = atomic_load(&p->got), have = fdpool_count(&p->fds);
    int batch = got < want ? got : want;
    if (have == 0 || have > batch || monotonic_ns() < atomic_load(&p->refill_after) || !move(p, me, IDLE, ASKING))
        return;
    int err = broker_preissue_send(p->family, protocol, want, &p->pending, g);
    if (err != 0) {
        set(p, me, IDLE);
        if (err != EAGAIN) /* EAGAIN: no room to keep the request, not a broker's failure */
            hold_off(p, atomic_fetch_add(&p->failures, 1), broker_strerror(err));
        return;
    }
    set(p, me, PENDING);
}

/* The reply to a request sent ahead, into the pool; with wait, waited for. Whether one was collected. */
static bool collect(struct family_pool *p, pid_t me, bool wait, int *unreachable, struct forkguard *g)
{
    if (!move(p, me, PENDING, COLLECTING))
        return false;
    int fds[GRAFT_PREISSUE_MAX], nfds, refused;
    int err = broker_preissue_collect(&p->pending, wait, fds, &nfds, &refused, g);
    if (err == EAGAIN && !wait) {
        set(p, me, PENDING); /* not yet */
        return false;
    }
    set(p, me, IDLE);
    settle_batch(p, err, refused, fds, nfds, false, unreachable);
    return true;
}

/* The pool is empty and nothing is on its way: one round trip, a socket for the caller, the rest pooled. */
static int refill(struct family_pool *p, pid_t me, int protocol, int *unreachable, struct forkguard *g)
{
    if (monotonic_ns() < atomic_load(&p->refill_after) || !move(p, me, IDLE, ASKING))
        return -1;
    int fds[GRAFT_PREISSUE_MAX], nfds, refused;
    int err = broker_preissue(p->family, protocol, atomic_load(&p->want), fds, &nfds, &refused, g);
    set(p, me, IDLE);
    return settle_batch(p, err, refused, fds, nfds, true, unreachable);
}

bool preissue_in_use(int family)
{
    return atomic_load_explicit(&pool_of(family)->last_batch, memory_order_relaxed) != 0;
}

struct preissued preissue_take_ready(int family, int protocol, struct forkguard *g)
{
    struct family_pool *p = pool_of(family);
    struct preissued out = {.fd = -1, .ino = 0, .gen = atomic_load(&generation), .unreachable = 0};
    if (!fdpool_owned(&p->fds))
        return out;
    pid_t me = sigmask_getpid();
    collect(p, me, false, NULL, g); /* a reply that has come: pooled before anything is taken */
    /* Before the take: sending releases the fork guard, and a socket in hand then would reach a fork child. */
    ask_ahead(p, me, protocol, g);
    out.fd = fdpool_pop(&p->fds, &out.ino);
    return out;
}

struct preissued preissue_take(int family, int protocol, struct forkguard *g)
{
    struct family_pool *p = pool_of(family);
    struct preissued out = preissue_take_ready(family, protocol, g);
    if (out.fd >= 0 || !fdpool_owned(&p->fds))
        return out;
    pid_t me = sigmask_getpid();
    /* Dry: the reply on its way is the soonest socket; without one, a round trip of our own. */
    if (collect(p, me, true, &out.unreachable, g))
        out.fd = fdpool_pop(&p->fds, &out.ino);
    else if (out.unreachable == 0)
        out.fd = refill(p, me, protocol, &out.unreachable, g);
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
    pid_t me = sigmask_getpid();
    for (size_t i = 0; i < N_POOLS; i++) {
        fdpool_flush(&pools[i].fds);
        if (move(&pools[i], me, PENDING, COLLECTING)) { /* its sockets would be as suspect as the pool's */
            broker_pending_drop(&pools[i].pending);
            set(&pools[i], me, IDLE);
        }
    }
    struct family_pool *p = pool_of(family);
    unsigned int before = atomic_fetch_add(&p->failures, 1);
    if (before > 0)
        hold_off(p, before - 1, "the kernel refused pre-issued sockets again");
}
