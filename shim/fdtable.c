/*
 * fdtable.c: the per-fd state of the shim (see fdtable.h), a two-level
 * radix table indexed by fd number.
 *
 * Layout: a static top level of TOP_SLOTS atomic page pointers; a page of
 * PAGE_SLOTS atomic entry pointers is calloc'd the first time one of its
 * fds is tracked. Pages and entries are installed with compare-and-swap and
 * never freed: an entry stays attached to its fd number and is reset when
 * the number is reused. That bounds memory by the highest socket fd ever
 * tracked, and means no reader can ever see freed memory, which keeps the
 * close() path free of locks (when untracked) and of allocation (always).
 *
 * Entry contents are protected by a mutex chosen by fd number from a small
 * striped set; an entry's state is also atomic so that fast paths can
 * check it without the lock. Every lock is taken with all signals blocked:
 * a signal handler that calls close() on a tracked fd can then never
 * interrupt its own thread while that thread holds the same stripe.
 */
#include "fdtable.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE_BITS  15
#define PAGE_SLOTS (1u << PAGE_BITS)
#define TOP_SLOTS  (1u << PAGE_BITS)
#define FD_LIMIT   (TOP_SLOTS * PAGE_SLOTS)
#define N_STRIPES  64

_Static_assert(FD_LIMIT == 1u << 30, "fds below 2^30 are tracked, larger ones pass through");

struct entry {
    _Atomic int state; /* enum fdt_state */
    ino_t ino;         /* the socket's inode while state != FDT_NONE */
    struct fdt_sock sock;
};

typedef _Atomic(struct entry *) slot_t;

static _Atomic(slot_t *) top[TOP_SLOTS];
static pthread_mutex_t stripes[N_STRIPES] = {[0 ... N_STRIPES - 1] = PTHREAD_MUTEX_INITIALIZER};

/* The process whose fds the table describes (see owned()). */
static _Atomic pid_t owner;

/* Signal mask of the forking thread, saved by fork_prepare. */
static sigset_t fork_saved_mask;

/*
 * A vfork or CLONE_VM child shares this memory but has its own fd table
 * (and pthread_atfork handlers do not run for it), so it must not change
 * what the parent knows. A fork child becomes the owner in fork_child.
 */
static bool owned(void)
{
    return getpid() == atomic_load_explicit(&owner, memory_order_relaxed);
}

/* ---- locking ---- */

struct held {
    pthread_mutex_t *mutex;
    sigset_t saved;
};

static void lock_fd(int fd, struct held *h)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &h->saved);
    h->mutex = &stripes[(unsigned)fd % N_STRIPES];
    pthread_mutex_lock(h->mutex);
}

static void unlock_fd(struct held *h)
{
    pthread_mutex_unlock(h->mutex);
    pthread_sigmask(SIG_SETMASK, &h->saved, NULL);
}

/*
 * fork() with a stripe held by another thread would leave it locked forever
 * in the child: take them all across the fork.
 */
static void fork_prepare(void)
{
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    for (int i = 0; i < N_STRIPES; i++)
        pthread_mutex_lock(&stripes[i]);
    fork_saved_mask = saved; /* written only while holding every stripe */
}

static void fork_unlock_all(void)
{
    sigset_t saved = fork_saved_mask;
    for (int i = N_STRIPES - 1; i >= 0; i--)
        pthread_mutex_unlock(&stripes[i]);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

static void fork_child(void)
{
    atomic_store_explicit(&owner, getpid(), memory_order_relaxed);
    fork_unlock_all();
}

void fdt_init(void)
{
    atomic_store_explicit(&owner, getpid(), memory_order_relaxed);
    pthread_atfork(fork_prepare, fork_unlock_all, fork_child);
}

/* ---- lookup ---- */

bool fdt_in_range(int fd)
{
    return fd >= 0 && (unsigned)fd < FD_LIMIT;
}

static slot_t *slot_of(int fd)
{
    slot_t *page = atomic_load_explicit(&top[(unsigned)fd >> PAGE_BITS], memory_order_acquire);
    return page != NULL ? &page[(unsigned)fd & (PAGE_SLOTS - 1)] : NULL;
}

/* The entry of fd, or NULL; never blocks. fd must be in range. */
static struct entry *entry_of(int fd)
{
    slot_t *slot = slot_of(fd);
    return slot != NULL ? atomic_load_explicit(slot, memory_order_acquire) : NULL;
}

/* fd's entry if it is tracked (not FDT_NONE), else NULL: the lock-free fast path. */
static struct entry *live_entry(int fd)
{
    if (!fdt_in_range(fd))
        return NULL;
    struct entry *e = entry_of(fd);
    if (e == NULL || atomic_load_explicit(&e->state, memory_order_acquire) == FDT_NONE)
        return NULL;
    return e;
}

/*
 * Page and entry creation race only with other creators (readers never
 * block): the first CAS wins and a loser frees its unpublished copy.
 */
static slot_t *page_create(unsigned int index)
{
    slot_t *page = atomic_load_explicit(&top[index], memory_order_acquire);
    if (page != NULL)
        return page;
    slot_t *fresh = calloc(PAGE_SLOTS, sizeof *fresh);
    if (fresh == NULL)
        return NULL;
    if (atomic_compare_exchange_strong_explicit(&top[index], &page, fresh, memory_order_acq_rel,
                                                memory_order_acquire))
        return fresh;
    free(fresh);
    return page;
}

/* The entry of fd, created on first use; NULL on allocation failure. */
static struct entry *entry_create(int fd)
{
    slot_t *page = page_create((unsigned)fd >> PAGE_BITS);
    if (page == NULL)
        return NULL;
    slot_t *slot = &page[(unsigned)fd & (PAGE_SLOTS - 1)];
    struct entry *e = atomic_load_explicit(slot, memory_order_acquire);
    if (e != NULL)
        return e;
    struct entry *fresh = calloc(1, sizeof *fresh);
    if (fresh == NULL)
        return NULL;
    if (atomic_compare_exchange_strong_explicit(slot, &e, fresh, memory_order_acq_rel,
                                                memory_order_acquire))
        return fresh;
    free(fresh);
    return e;
}

/* ---- state changes (all with the entry's stripe held) ---- */

/* A new use of the fd number: new identity, new contents. */
static void reset(struct entry *e, ino_t ino, const struct fdt_sock *desc, enum fdt_state state)
{
    uint64_t gen = e->sock.gen + 1;
    e->sock = *desc;
    e->sock.gen = gen;
    e->ino = ino;
    atomic_store_explicit(&e->state, state, memory_order_release);
}

static void forget(struct entry *e)
{
    e->sock.gen++;
    atomic_store_explicit(&e->state, FDT_NONE, memory_order_release);
}

/* The entry still holds the claim identified by gen. */
static bool claim_held(const struct entry *e, uint64_t gen)
{
    return e != NULL && e->sock.gen == gen &&
           atomic_load_explicit(&e->state, memory_order_relaxed) == FDT_BUSY;
}

void fdt_track(int fd, ino_t ino, const struct fdt_sock *desc)
{
    if (!fdt_in_range(fd) || !owned())
        return;
    struct entry *e = entry_create(fd);
    if (e == NULL)
        return; /* out of memory: the socket stays untracked, like a large fd */
    struct held h;
    lock_fd(fd, &h);
    reset(e, ino, desc, FDT_PLACEHOLDER);
    unlock_fd(&h);
}

bool fdt_adopt(int fd, ino_t ino, struct fdt_sock *desc)
{
    if (!fdt_in_range(fd) || !owned())
        return false;
    struct entry *e = entry_create(fd);
    if (e == NULL)
        return false;
    struct held h;
    bool adopted = false;
    lock_fd(fd, &h);
    if (atomic_load_explicit(&e->state, memory_order_relaxed) == FDT_NONE) {
        reset(e, ino, desc, FDT_BUSY);
        desc->gen = e->sock.gen;
        adopted = true;
    }
    unlock_fd(&h);
    return adopted;
}

static enum fdt_opt record_locked(struct fdt_sock *s, int level, int name, const void *val,
                                  socklen_t len)
{
    uint32_t i = 0;
    while (i < s->n_opts && !(s->opts[i].level == level && s->opts[i].name == name))
        i++;
    if (i == GRAFT_MAX_OPTS)
        return FDT_OPT_TOO_MANY;
    if (i == s->n_opts)
        s->n_opts++;
    struct graft_sockopt *o = &s->opts[i];
    memset(o, 0, sizeof *o);
    o->level = level;
    o->name = name;
    o->len = len;
    if (len > 0)
        memcpy(o->val, val, len);
    return FDT_OPT_RECORDED;
}

enum fdt_opt fdt_record_opt(int fd, int level, int name, const void *val, socklen_t len)
{
    struct entry *e = live_entry(fd);
    if (e == NULL || atomic_load_explicit(&e->state, memory_order_relaxed) != FDT_PLACEHOLDER ||
        !owned())
        return FDT_OPT_IGNORED;
    if (len > GRAFT_OPT_VAL_MAX)
        return FDT_OPT_TOO_LONG;

    struct held h;
    enum fdt_opt r = FDT_OPT_IGNORED;
    lock_fd(fd, &h);
    if (atomic_load_explicit(&e->state, memory_order_relaxed) == FDT_PLACEHOLDER)
        r = record_locked(&e->sock, level, name, val, len);
    unlock_fd(&h);
    return r;
}

enum fdt_claim fdt_claim(int fd, ino_t ino, struct fdt_sock *out)
{
    struct entry *e = live_entry(fd);
    if (e == NULL || !owned())
        return FDT_UNTRACKED;

    struct held h;
    enum fdt_claim r;
    lock_fd(fd, &h);
    int state = atomic_load_explicit(&e->state, memory_order_relaxed);
    if (state == FDT_NONE) {
        r = FDT_UNTRACKED;
    } else if (e->ino != ino) {
        forget(e); /* closed without our close() (fclose, raw syscall...) and reused */
        r = FDT_UNTRACKED;
    } else if (state != FDT_PLACEHOLDER) {
        r = FDT_DECIDED;
    } else {
        atomic_store_explicit(&e->state, FDT_BUSY, memory_order_relaxed);
        *out = e->sock;
        r = FDT_CLAIMED;
    }
    unlock_fd(&h);
    return r;
}

void fdt_release(int fd, uint64_t gen, enum fdt_state state)
{
    struct entry *e = entry_of(fd);
    struct held h;
    lock_fd(fd, &h);
    if (claim_held(e, gen))
        atomic_store_explicit(&e->state, state, memory_order_release);
    unlock_fd(&h);
}

void fdt_release_bound(int fd, uint64_t gen, const void *addr, socklen_t len)
{
    struct entry *e = entry_of(fd);
    struct held h;
    lock_fd(fd, &h);
    if (claim_held(e, gen)) {
        e->sock.bound = true;
        e->sock.bound_len = len < GRAFT_ADDR_MAX ? len : GRAFT_ADDR_MAX;
        memcpy(e->sock.bound_addr, addr, e->sock.bound_len);
        atomic_store_explicit(&e->state, FDT_PLACEHOLDER, memory_order_release);
    }
    unlock_fd(&h);
}

int fdt_commit(int fd, uint64_t gen, ino_t ino, int (*install)(void *), void *arg)
{
    struct entry *e = entry_of(fd);
    struct held h;
    int err = EBADF; /* the app closed fd while the broker was deciding */
    lock_fd(fd, &h);
    if (claim_held(e, gen)) {
        err = install(arg);
        if (err == 0)
            e->ino = ino;
        atomic_store_explicit(&e->state, err == 0 ? FDT_GRAFTED : FDT_PLACEHOLDER,
                              memory_order_release);
    }
    unlock_fd(&h);
    return err;
}

static void drop_entry(int fd, struct entry *e)
{
    struct held h;
    lock_fd(fd, &h);
    if (atomic_load_explicit(&e->state, memory_order_relaxed) != FDT_NONE)
        forget(e);
    unlock_fd(&h);
}

void fdt_drop(int fd)
{
    struct entry *e = live_entry(fd);
    if (e != NULL && owned())
        drop_entry(fd, e);
}

void fdt_drop_range(unsigned int first, unsigned int last)
{
    if (first >= FD_LIMIT || first > last || !owned())
        return;
    if (last >= FD_LIMIT)
        last = FD_LIMIT - 1;

    for (unsigned int p = first >> PAGE_BITS; p <= last >> PAGE_BITS; p++) {
        slot_t *page = atomic_load_explicit(&top[p], memory_order_acquire);
        if (page == NULL)
            continue;
        unsigned int lo = p == first >> PAGE_BITS ? first & (PAGE_SLOTS - 1) : 0;
        unsigned int hi = p == last >> PAGE_BITS ? last & (PAGE_SLOTS - 1) : PAGE_SLOTS - 1;
        for (unsigned int i = lo; i <= hi; i++) {
            struct entry *e = atomic_load_explicit(&page[i], memory_order_acquire);
            if (e != NULL && atomic_load_explicit(&e->state, memory_order_acquire) != FDT_NONE)
                drop_entry((int)(p << PAGE_BITS | i), e);
        }
    }
}
