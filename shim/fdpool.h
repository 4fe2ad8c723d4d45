/*
 * fdpool.h: a small lock-free set of fds that belong to the shim rather than
 * to the application: the pooled broker connections (broker_conn.c) and the
 * pre-issued host sockets of the connect fast path (preissue.c).
 *
 * Each slot is empty, idle (holds an fd) or busy (its fd is lent to one
 * thread). Slots change by compare-and-swap only, so there is no mutex to
 * leave locked across fork() and nothing a signal handler could deadlock on.
 *
 * The fds live in the application's fd table, which the shim does not
 * control: a daemon closing "all" its fds, or a dup2 onto the number, may
 * close a pooled fd and reuse the number. A slot therefore records what it
 * was given (st_dev, st_ino), and every use checks that with fstat first; a
 * slot whose fd is no longer ours is emptied without closing the number,
 * which now belongs to the application.
 *
 * A pool belongs to one process. A fork child empties every pool and closes
 * its copies of the fds, idle or lent (the borrowing thread does not exist
 * in the child). An fd of the shim's that is in no pool is kept from
 * reaching a fork child by the fork guard (forkguard.h). A vfork/CLONE_VM child shares the memory but not the fd
 * table, and no fork handler runs for it: it sees another pid, and every
 * operation treats the pool as empty and full. The fds are O_CLOEXEC, so an
 * exec leaves none behind.
 */
#ifndef GRAFT_FDPOOL_H
#define GRAFT_FDPOOL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

/* Two of the largest pre-issue batch (preissue.c asks for one more when one is left). */
#define FDPOOL_SLOTS 128

/* The identity of a slot's fd, written while the filler holds the slot busy. */
struct fdpool_id {
    dev_t dev;
    ino_t ino;
};

/*
 * The slots' words apart from their identities: every take and add scans
 * the words, and 128 of them are 8 cache lines where words and identities
 * together were 48 (a profile of the connect loop put the scans, and a
 * count that scanned too, at a third of the shim's own time;
 * docs/benchmarks.md).
 */
struct fdpool {
    atomic_uint slot[FDPOOL_SLOTS]; /* 0: empty; else (fd + 1) << 1 | busy */
    struct fdpool_id id[FDPOOL_SLOTS];
    atomic_int used; /* slots not empty, kept beside them so that a count is one load */
    _Atomic pid_t owner;
    struct fdpool *next; /* every pool, for the fork-child handler */
};

/* Makes p (zeroed, static) this process's and empties it in fork children. Call once. */
void fdpool_init(struct fdpool *p);

/* The fork-child handler (called by forkguard.c): closes every pool's fds, idle or lent. */
void fdpool_fork_child(void);

/* Whether the calling process owns p: false in a vfork/CLONE_VM child. */
bool fdpool_owned(struct fdpool *p);

/* Lends an idle fd that still is ours: returns it and its slot, or -1. */
int fdpool_borrow(struct fdpool *p, int *slot);

/* Ends a loan: the fd is idle again. */
void fdpool_give_back(struct fdpool *p, int slot);

/* Ends a loan by emptying the slot: the borrower keeps (and closes) the fd. */
void fdpool_remove(struct fdpool *p, int slot);

/* Registers fd, already lent to the caller. Returns its slot, or -1 if full. */
int fdpool_lend_new(struct fdpool *p, int fd);

/* Adds fd idle; false if the pool is full (the caller keeps the fd). */
bool fdpool_add(struct fdpool *p, int fd);

/* Takes an idle fd out of the pool for good, or -1; *ino is its inode (checked by the take). */
int fdpool_pop(struct fdpool *p, ino_t *ino);

/* Closes every idle fd. Lent ones are left to their borrowers. */
void fdpool_flush(struct fdpool *p);

/* How many fds the pool holds, idle or lent (a moment's count: others may change it at once). */
int fdpool_count(struct fdpool *p);

#endif /* GRAFT_FDPOOL_H */
