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
 *
 * Rings of duplicates. dup() of a placeholder gives a second fd number for
 * the same socket. A graft must then move *both* numbers to the host
 * socket (the app may connect through one and read through the other), so
 * the entries of duplicates are linked in a doubly linked ring (by fd
 * number, entries are never freed) and every state change applies to the
 * whole ring. A link is changed only with ring_lock held and the stripes of
 * every entry involved, so:
 *   - holding an entry's stripe keeps its "alone" status and links stable:
 *     an alone entry (the common case) needs its stripe only, as before;
 *   - holding ring_lock keeps every ring's membership stable, so the set of
 *     stripes a ring needs can be computed and then locked.
 * Lock order: ring_lock, then stripes in ascending index. A thread holding
 * a stripe without ring_lock never waits for another lock.
 * Invariant: ring members are PLACEHOLDER or BUSY; a decided or forgotten
 * entry is alone. Exactly one member of a BUSY ring is the claimant.
 */
#include "fdtable.h"
#include "sigmask.h"

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
_Static_assert(N_STRIPES <= 64, "a set of stripes is a 64-bit mask");

struct entry {
    _Atomic int state;       /* enum fdt_state */
    _Atomic bool has_names;  /* GRAFTED with a translated address in names */
    _Atomic bool on_host;    /* sock.on_host, for the lock-free hint */
    int fd;                  /* the fd number this entry belongs to, for life */
    int next, prev;          /* ring of duplicates (fd numbers); fd itself when alone */
    bool claimant;           /* BUSY: this member's claim is the one in progress */
    ino_t ino;               /* the socket's inode while state != FDT_NONE */
    struct fdt_sock sock;
    struct fdt_names names;
    struct fdt_polls polls; /* while undecided: this fd number's epoll registrations */
};

typedef _Atomic(struct entry *) slot_t;

static _Atomic(slot_t *) top[TOP_SLOTS];
static pthread_mutex_t stripes[N_STRIPES] = {[0 ... N_STRIPES - 1] = PTHREAD_MUTEX_INITIALIZER};
static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;

/* The process whose fds the table describes (see owned()). */
static _Atomic pid_t owner;

/*
 * A vfork or CLONE_VM child shares this memory but has its own fd table
 * (and pthread_atfork handlers do not run for it), so it must not change
 * what the parent knows. A fork child becomes the owner in fdt_fork_child.
 */
static bool owned(void)
{
    return sigmask_getpid() == atomic_load_explicit(&owner, memory_order_relaxed);
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
    fresh->fd = fresh->next = fresh->prev = fd; /* alone */
    if (atomic_compare_exchange_strong_explicit(slot, &e, fresh, memory_order_acq_rel,
                                                memory_order_acquire))
        return fresh;
    free(fresh);
    return e;
}

/* ---- rings (links are read with the entry's stripe or ring_lock held) ---- */

static bool alone(const struct entry *e)
{
    return e->next == e->fd;
}

/* Ring members always have entries: they were tracked. */
static struct entry *ring_next(const struct entry *e)
{
    return entry_of(e->next);
}

static unsigned int stripe_of(int fd)
{
    return (unsigned)fd % N_STRIPES;
}

/* The stripes of e's ring; ring_lock held. Bounded by the number of fds. */
static uint64_t ring_mask(const struct entry *e)
{
    uint64_t mask = 0;
    const struct entry *m = e;
    for (unsigned int n = 0; n < FD_LIMIT; n++) {
        mask |= UINT64_C(1) << stripe_of(m->fd);
        m = ring_next(m);
        if (m == e)
            break;
    }
    return mask;
}

/* Links n (alone) into a's ring, after a. */
static void link_after(struct entry *a, struct entry *n)
{
    struct entry *b = ring_next(a);
    n->next = a->next;
    n->prev = a->fd;
    b->prev = n->fd;
    a->next = n->fd;
}

static void unlink_entry(struct entry *e)
{
    if (alone(e))
        return;
    entry_of(e->prev)->next = e->next;
    entry_of(e->next)->prev = e->prev;
    e->next = e->prev = e->fd;
}

/* ---- locking ---- */

struct held {
    uint64_t mask; /* stripes held */
    bool ring;     /* ring_lock held */
    struct sigmask_hold signals;
};

/* Inside the fork guard (a connect's claim and commit) they are blocked already: sigmask.h. */
static void block_signals(struct held *h)
{
    sigmask_block_all(&h->signals);
}

static void lock_mask(uint64_t mask)
{
    for (unsigned int i = 0; i < N_STRIPES; i++)
        if (mask & (UINT64_C(1) << i))
            pthread_mutex_lock(&stripes[i]);
}

static void unlock_mask(uint64_t mask)
{
    for (unsigned int i = N_STRIPES; i-- > 0;)
        if (mask & (UINT64_C(1) << i))
            pthread_mutex_unlock(&stripes[i]);
}

/*
 * Locks fd's entry e (may be NULL) and, if it is in a ring, every member.
 * An alone entry takes only its stripe; a ring member drops it and starts
 * over in lock order. Callers re-read the state afterwards either way.
 */
static void lock_group(int fd, const struct entry *e, struct held *h)
{
    block_signals(h);
    h->mask = UINT64_C(1) << stripe_of(fd);
    h->ring = false;
    pthread_mutex_lock(&stripes[stripe_of(fd)]);
    if (e == NULL || alone(e))
        return;
    pthread_mutex_unlock(&stripes[stripe_of(fd)]);
    pthread_mutex_lock(&ring_lock);
    h->ring = true;
    h->mask = ring_mask(e);
    lock_mask(h->mask);
}

/* Locks the rings of two entries (for dup). */
static void lock_pair(const struct entry *a, const struct entry *b, struct held *h)
{
    block_signals(h);
    pthread_mutex_lock(&ring_lock);
    h->ring = true;
    h->mask = ring_mask(a) | ring_mask(b);
    lock_mask(h->mask);
}

static void unlock_group(struct held *h)
{
    unlock_mask(h->mask);
    if (h->ring)
        pthread_mutex_unlock(&ring_lock);
    sigmask_restore(&h->signals);
}

/*
 * fork() with a lock held by another thread would leave it locked forever
 * in the child: the fork handlers (forkguard.c, with every signal blocked)
 * take them all across it.
 */
void fdt_fork_prepare(void)
{
    pthread_mutex_lock(&ring_lock);
    lock_mask(~UINT64_C(0));
}

void fdt_fork_parent(void)
{
    unlock_mask(~UINT64_C(0));
    pthread_mutex_unlock(&ring_lock);
}

void fdt_fork_child(void)
{
    atomic_store_explicit(&owner, getpid(), memory_order_relaxed);
    fdt_fork_parent();
}

void fdt_init(void)
{
    atomic_store_explicit(&owner, getpid(), memory_order_relaxed);
}

/* ---- state changes (all with the entry's group locked) ---- */

static int state_of(const struct entry *e)
{
    return atomic_load_explicit(&e->state, memory_order_relaxed);
}

static void set_state(struct entry *e, enum fdt_state state)
{
    atomic_store_explicit(&e->state, state, memory_order_release);
}

/* Sets every member of e's ring (e included) to state; a claim ends. */
static void ring_set_state(struct entry *e, enum fdt_state state)
{
    struct entry *m = e;
    do {
        m->claimant = false;
        set_state(m, state);
        m = ring_next(m);
    } while (m != e);
}

/*
 * Takes e out of its ring. If e held the ring's claim, the claim dies with
 * it (the claimant's commit finds it gone): the other members become
 * placeholders again, free to be decided anew.
 */
static void detach(struct entry *e)
{
    if (alone(e))
        return;
    struct entry *rest = ring_next(e);
    bool was_claimant = e->claimant && state_of(e) == FDT_BUSY;
    unlink_entry(e);
    if (was_claimant)
        ring_set_state(rest, FDT_PLACEHOLDER);
}

/* A new use of the fd number: new identity, new contents. */
static void reset(struct entry *e, ino_t ino, const struct fdt_sock *desc, enum fdt_state state)
{
    detach(e);
    uint64_t gen = e->sock.gen + 1;
    e->sock = *desc;
    e->sock.gen = gen;
    atomic_store_explicit(&e->on_host, desc->on_host, memory_order_relaxed);
    e->ino = ino;
    e->polls.n = 0;
    e->claimant = false;
    atomic_store_explicit(&e->has_names, false, memory_order_relaxed);
    set_state(e, state);
}

static void forget(struct entry *e)
{
    detach(e);
    e->polls.n = 0;
    e->sock.gen++;
    e->claimant = false;
    atomic_store_explicit(&e->has_names, false, memory_order_relaxed);
    set_state(e, FDT_NONE);
}

/* The entry still holds the claim identified by gen. */
static bool claim_held(const struct entry *e, uint64_t gen)
{
    return e != NULL && e->sock.gen == gen && state_of(e) == FDT_BUSY && e->claimant;
}

void fdt_track(int fd, ino_t ino, const struct fdt_sock *desc)
{
    if (!fdt_in_range(fd) || !owned())
        return;
    struct entry *e = entry_create(fd);
    if (e == NULL)
        return; /* out of memory: the socket stays untracked, like a large fd */
    struct held h;
    lock_group(fd, e, &h);
    reset(e, ino, desc, FDT_PLACEHOLDER);
    unlock_group(&h);
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
    lock_group(fd, e, &h);
    if (state_of(e) == FDT_NONE) { /* then alone, by the invariant */
        reset(e, ino, desc, FDT_BUSY);
        e->claimant = true;
        desc->gen = e->sock.gen;
        adopted = true;
    }
    unlock_group(&h);
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

static bool undecided(const struct entry *e)
{
    int state = state_of(e);
    return state == FDT_PLACEHOLDER || state == FDT_BUSY;
}

/* The epoll_ctl that succeeded, on e's list of registrations; false if an ADD found no room. */
static bool record_poll(struct fdt_polls *p, int epfd, int op, const struct epoll_event *event)
{
    unsigned int i = 0;
    while (i < p->n && p->at[i].epfd != epfd)
        i++;
    if (op == EPOLL_CTL_DEL) {
        if (i < p->n)
            p->at[i] = p->at[--p->n];
        return true;
    }
    if (i == p->n) {
        if (op != EPOLL_CTL_ADD)
            return true; /* a MOD of what was added before the fd was tracked */
        if (p->n == FDT_MAX_POLLS)
            return false;
        p->n++;
    }
    p->at[i].epfd = epfd;
    p->at[i].event = *event;
    return true;
}

int fdt_epoll_ctl(int epfd, int op, int fd, struct epoll_event *event, fdt_epoll_fn real, bool *unrecorded)
{
    *unrecorded = false;
    struct entry *e = live_entry(fd);
    if (e == NULL || !undecided(e) || !owned() || (op != EPOLL_CTL_DEL && event == NULL))
        return real(epfd, op, fd, event);
    struct held h;
    lock_group(fd, e, &h);
    int rc = real(epfd, op, fd, event);
    int saved = errno;
    if (rc == 0 && undecided(e))
        *unrecorded = !record_poll(&e->polls, epfd, op, event);
    unlock_group(&h);
    errno = saved;
    return rc;
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
    lock_group(fd, e, &h);
    if (state_of(e) == FDT_PLACEHOLDER) {
        /* One socket, so one set of options for all its fd numbers. */
        struct entry *m = e;
        do {
            enum fdt_opt rm = record_locked(&m->sock, level, name, val, len);
            if (m == e)
                r = rm;
            m = ring_next(m);
        } while (m != e);
    }
    unlock_group(&h);
    return r;
}

enum fdt_claim fdt_claim(int fd, ino_t ino, struct fdt_sock *out)
{
    struct entry *e = live_entry(fd);
    if (e == NULL || !owned())
        return FDT_UNTRACKED;

    struct held h;
    enum fdt_claim r;
    lock_group(fd, e, &h);
    int state = state_of(e);
    if (state == FDT_NONE) {
        r = FDT_UNTRACKED;
    } else if (e->ino != ino) {
        forget(e); /* closed without our close() (fclose, raw syscall...) and reused */
        r = FDT_UNTRACKED;
    } else if (state != FDT_PLACEHOLDER) {
        r = FDT_DECIDED;
    } else {
        ring_set_state(e, FDT_BUSY); /* a duplicate is not decided twice at once */
        e->claimant = true;
        *out = e->sock;
        r = FDT_CLAIMED;
    }
    unlock_group(&h);
    return r;
}

/* Ends the ring: every member alone in state. */
static void dissolve(struct entry *e, enum fdt_state state)
{
    while (!alone(e)) {
        struct entry *m = ring_next(e);
        unlink_entry(m);
        m->claimant = false;
        set_state(m, state);
    }
    e->claimant = false;
    set_state(e, state);
}

void fdt_release(int fd, uint64_t gen, enum fdt_state state)
{
    struct entry *e = entry_of(fd);
    struct held h;
    lock_group(fd, e, &h);
    if (claim_held(e, gen)) {
        if (state == FDT_PLACEHOLDER)
            ring_set_state(e, state); /* undecided: still duplicates of one placeholder */
        else
            dissolve(e, state);
    }
    unlock_group(&h);
}

void fdt_release_bound(int fd, uint64_t gen, const void *addr, socklen_t len)
{
    struct entry *e = entry_of(fd);
    struct held h;
    lock_group(fd, e, &h);
    if (claim_held(e, gen)) {
        struct entry *m = e;
        do {
            m->sock.bound = true;
            m->sock.bound_len = len < GRAFT_ADDR_MAX ? len : GRAFT_ADDR_MAX;
            memcpy(m->sock.bound_addr, addr, m->sock.bound_len);
            m = ring_next(m);
        } while (m != e);
        ring_set_state(e, FDT_PLACEHOLDER);
    }
    unlock_group(&h);
}

static void set_grafted(struct entry *e, ino_t ino, const struct fdt_names *names)
{
    e->ino = ino;
    if (names != NULL)
        e->names = *names;
    atomic_store_explicit(&e->has_names, names != NULL, memory_order_relaxed);
    e->claimant = false;
    set_state(e, FDT_GRAFTED);
}

/*
 * Runs install on e and then on every other member of its ring, under the
 * group's locks. done(m) settles a member it worked on; a member it fails
 * on is forgotten (it keeps its old file and is adopted again later). The
 * ring is dissolved, the members alone, unless keep_ring. 0, or install's
 * errno on e, which leaves the ring as it was.
 */
static int install_ring(struct entry *e, bool keep_ring, fdt_install_fn install, void *arg,
                        void (*done)(struct entry *m, const void *how), const void *how)
{
    int err = install(e->fd, e->ino, &e->polls, arg);
    if (err != 0)
        return err;
    struct entry *m = ring_next(e);
    while (m != e) {
        struct entry *next = ring_next(m);
        if (install(m->fd, m->ino, &m->polls, arg) != 0) {
            unlink_entry(m);
            m->sock.gen++;
            m->claimant = false;
            set_state(m, FDT_NONE);
        } else {
            if (!keep_ring)
                unlink_entry(m);
            done(m, how);
        }
        m = next;
    }
    done(e, how);
    return 0;
}

struct graft_how {
    ino_t ino;
    const struct fdt_names *names;
};

static void graft_done(struct entry *m, const void *how)
{
    const struct graft_how *g = how;
    set_grafted(m, g->ino, g->names);
}

int fdt_commit(int fd, uint64_t gen, ino_t ino, const struct fdt_names *names,
               fdt_install_fn install, void *arg)
{
    struct entry *e = entry_of(fd);
    struct held h;
    int err = EBADF; /* the app closed fd while the broker was deciding */
    lock_group(fd, e, &h);
    if (claim_held(e, gen)) {
        /* The duplicates: every fd number of the socket moves to the host. */
        struct graft_how how = {ino, names};
        err = install_ring(e, false, install, arg, graft_done, &how);
        if (err != 0)
            ring_set_state(e, FDT_PLACEHOLDER);
    }
    unlock_group(&h);
    return err;
}

static void replace_done(struct entry *m, const void *how)
{
    m->ino = *(const ino_t *)how;
    m->sock.on_host = false;
    atomic_store_explicit(&m->on_host, false, memory_order_relaxed);
}

int fdt_replace(int fd, uint64_t gen, ino_t ino, fdt_install_fn install, void *arg)
{
    struct entry *e = entry_of(fd);
    struct held h;
    int err = EBADF;
    lock_group(fd, e, &h);
    if (claim_held(e, gen))
        err = install_ring(e, true, install, arg, replace_done, &ino);
    unlock_group(&h);
    return err;
}

bool fdt_reclaim(int fd, uint64_t gen, struct fdt_sock *out)
{
    struct entry *e = entry_of(fd);
    struct held h;
    bool claimed = false;
    lock_group(fd, e, &h);
    if (e != NULL && e->sock.gen == gen && state_of(e) == FDT_GRAFTED && alone(e)) {
        e->claimant = true;
        set_state(e, FDT_BUSY);
        *out = e->sock;
        claimed = true;
    }
    unlock_group(&h);
    return claimed;
}

bool fdt_is_placeholder(int fd)
{
    struct entry *e = live_entry(fd);
    return e != NULL && atomic_load_explicit(&e->state, memory_order_relaxed) == FDT_PLACEHOLDER;
}

bool fdt_is_host_placeholder(int fd)
{
    struct entry *e = live_entry(fd);
    return e != NULL && atomic_load_explicit(&e->state, memory_order_relaxed) == FDT_PLACEHOLDER &&
           atomic_load_explicit(&e->on_host, memory_order_relaxed);
}

bool fdt_is_tracked(int fd)
{
    return live_entry(fd) != NULL;
}

bool fdt_get_grafted(int fd, ino_t ino, struct fdt_sock *out)
{
    struct entry *e = live_entry(fd);
    if (e == NULL || atomic_load_explicit(&e->state, memory_order_relaxed) != FDT_GRAFTED)
        return false;
    struct held h;
    bool found = false;
    lock_group(fd, e, &h);
    if (state_of(e) == FDT_GRAFTED && e->ino == ino) {
        *out = e->sock;
        found = true;
    }
    unlock_group(&h);
    return found;
}

bool fdt_get_names(int fd, struct fdt_names *out)
{
    struct entry *e = live_entry(fd);
    if (e == NULL || !atomic_load_explicit(&e->has_names, memory_order_relaxed))
        return false;
    struct held h;
    bool found = false;
    lock_group(fd, e, &h);
    if (state_of(e) == FDT_GRAFTED && atomic_load_explicit(&e->has_names, memory_order_relaxed)) {
        *out = e->names;
        found = true;
    }
    unlock_group(&h);
    return found;
}

void fdt_dup(int oldfd, int newfd, ino_t ino)
{
    if (oldfd == newfd || !fdt_in_range(newfd) || !owned())
        return;
    struct entry *o = live_entry(oldfd);
    if (o == NULL)
        return; /* untracked: the lock-free common case */
    struct entry *n = entry_create(newfd);
    if (n == NULL)
        return;

    struct held h;
    lock_pair(o, n, &h);
    forget(n); /* whatever newfd was is gone (this may end a claim on o's ring) */
    int state = state_of(o);
    if (state != FDT_NONE && o->ino == ino) {
        uint64_t gen = n->sock.gen;
        n->sock = o->sock;
        n->sock.gen = gen;
        atomic_store_explicit(&n->on_host, n->sock.on_host, memory_order_relaxed);
        n->ino = o->ino;
        if (state == FDT_PLACEHOLDER || state == FDT_BUSY) {
            link_after(o, n); /* BUSY: the claim in progress will graft it too */
        } else {
            n->names = o->names;
            atomic_store_explicit(&n->has_names,
                                  atomic_load_explicit(&o->has_names, memory_order_relaxed),
                                  memory_order_relaxed);
        }
        set_state(n, state);
    }
    unlock_group(&h);
}

static void drop_entry(int fd, struct entry *e)
{
    struct held h;
    lock_group(fd, e, &h);
    if (state_of(e) != FDT_NONE)
        forget(e);
    unlock_group(&h);
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
