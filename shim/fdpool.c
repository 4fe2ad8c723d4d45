/*
 * fdpool.c: the lock-free fd pool of the shim's own fds (see fdpool.h).
 *
 * A slot is filled in two steps: a CAS from empty to "busy, no fd yet"
 * claims it, the identity is written, and a release store publishes the
 * fd. Whoever later sees the fd in the slot (with acquire) therefore also
 * sees its identity; a slot without an fd is skipped by everyone.
 */
#include "fdpool.h"

#include <sys/stat.h>
#include <unistd.h>

#include "real.h"
#include "sigmask.h"

#define SLOT_BUSY 1u

/* Every initialised pool; pushed under the callers' init, read by the fork child. */
static _Atomic(struct fdpool *) all_pools;

/* fd >= 0 is an int, so (fd + 1) << 1 fits an unsigned int. */
static unsigned int slot_pack(int fd, bool busy)
{
    return ((unsigned int)fd + 1) << 1 | (busy ? SLOT_BUSY : 0);
}

static int slot_fd(unsigned int v)
{
    return (int)(v >> 1) - 1;
}

static bool still_ours(const struct fdpool_id *id, int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == id->dev && st.st_ino == id->ino;
}

/*
 * The child's copies of the parent's fds: closed, whether idle or lent to
 * a thread the child does not have, unless the number was reused (closing
 * it would close the application's file).
 */
void fdpool_fork_child(void)
{
    pid_t me = getpid();
    for (struct fdpool *p = atomic_load(&all_pools); p != NULL; p = p->next) {
        for (int i = 0; i < FDPOOL_SLOTS; i++) {
            unsigned int v = atomic_exchange_explicit(&p->slot[i], 0, memory_order_acquire);
            int fd = slot_fd(v);
            if (fd >= 0 && still_ours(&p->id[i], fd))
                graft_real.close(fd);
        }
        atomic_store_explicit(&p->used, 0, memory_order_relaxed);
        atomic_store_explicit(&p->owner, me, memory_order_relaxed);
    }
}

void fdpool_init(struct fdpool *p)
{
    atomic_store_explicit(&p->owner, getpid(), memory_order_relaxed);
    p->next = atomic_load(&all_pools);
    while (!atomic_compare_exchange_weak(&all_pools, &p->next, p))
        ;
}

bool fdpool_owned(struct fdpool *p)
{
    return sigmask_getpid() == atomic_load_explicit(&p->owner, memory_order_relaxed);
}

/* Makes slot i busy if it is idle and its fd still is ours: the fd, or -1. */
static int claim_idle(struct fdpool *p, int i)
{
    atomic_uint *s = &p->slot[i];
    unsigned int v = atomic_load_explicit(s, memory_order_relaxed);
    if (v == 0 || (v & SLOT_BUSY))
        return -1;
    if (!atomic_compare_exchange_strong_explicit(s, &v, v | SLOT_BUSY, memory_order_acquire,
                                                 memory_order_relaxed))
        return -1;
    if (!still_ours(&p->id[i], slot_fd(v))) {
        fdpool_remove(p, i);
        return -1;
    }
    return slot_fd(v);
}

int fdpool_borrow(struct fdpool *p, int *slot)
{
    if (!fdpool_owned(p))
        return -1;
    for (int i = 0; i < FDPOOL_SLOTS; i++) {
        int fd = claim_idle(p, i);
        if (fd >= 0) {
            *slot = i;
            return fd;
        }
    }
    return -1;
}

void fdpool_give_back(struct fdpool *p, int slot)
{
    atomic_fetch_and_explicit(&p->slot[slot], ~SLOT_BUSY, memory_order_release);
}

void fdpool_remove(struct fdpool *p, int slot)
{
    atomic_store_explicit(&p->slot[slot], 0, memory_order_release);
    atomic_fetch_sub_explicit(&p->used, 1, memory_order_relaxed);
}

static int fill(struct fdpool *p, int fd, bool busy)
{
    struct stat st;
    if (!fdpool_owned(p) || fstat(fd, &st) < 0)
        return -1;
    for (int i = 0; i < FDPOOL_SLOTS; i++) {
        unsigned int expected = 0;
        /* A load first: a failed compare-and-swap still takes the line exclusive, at every full slot. */
        if (atomic_load_explicit(&p->slot[i], memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong_explicit(&p->slot[i], &expected, SLOT_BUSY,
                                                    memory_order_acquire, memory_order_relaxed)) {
            atomic_fetch_add_explicit(&p->used, 1, memory_order_relaxed);
            p->id[i] = (struct fdpool_id){.dev = st.st_dev, .ino = st.st_ino};
            atomic_store_explicit(&p->slot[i], slot_pack(fd, busy), memory_order_release);
            return i;
        }
    }
    return -1;
}

int fdpool_lend_new(struct fdpool *p, int fd)
{
    return fill(p, fd, true);
}

bool fdpool_add(struct fdpool *p, int fd)
{
    return fill(p, fd, false) >= 0;
}

int fdpool_pop(struct fdpool *p, ino_t *ino)
{
    int slot;
    int fd = fdpool_borrow(p, &slot);
    if (fd < 0)
        return -1;
    *ino = p->id[slot].ino; /* as the borrow's fstat just found it */
    fdpool_remove(p, slot);
    return fd;
}

void fdpool_flush(struct fdpool *p)
{
    if (!fdpool_owned(p))
        return;
    for (int i = 0; i < FDPOOL_SLOTS; i++) {
        int fd = claim_idle(p, i);
        if (fd >= 0) {
            fdpool_remove(p, i);
            graft_real.close(fd);
        }
    }
}

int fdpool_count(struct fdpool *p)
{
    return fdpool_owned(p) ? atomic_load_explicit(&p->used, memory_order_relaxed) : 0;
}
