/*
 * sigmask.h: every signal blocked around a section of the shim, with one
 * pair of system calls however deeply sections nest.
 *
 * The fork guard (forkguard.h) and the fd table's locks (fdtable.c) each
 * run with every signal blocked, so that a signal handler that forks,
 * grafts or closes a socket never runs on a thread that holds them. A
 * connect nests the table's locks inside the guard; each used to block and
 * restore the mask again, two rt_sigprocmask calls each for nothing. A
 * thread-local flag says that an outer section has blocked everything: an
 * inner one then leaves the mask alone. The flag is set after the mask is
 * blocked and cleared before it is restored, so no signal handler ever
 * runs while it is set, and a handler's own sections block as usual.
 */
#ifndef GRAFT_SIGMASK_H
#define GRAFT_SIGMASK_H

#include <signal.h>
#include <stdbool.h>
#include <sys/types.h>

struct sigmask_hold {
    bool blocked; /* this section blocked the mask (no outer one had) */
    sigset_t saved; /* the mask before, if blocked */
};

/* Blocks every signal, unless an outer section of this thread already has. */
void sigmask_block_all(struct sigmask_hold *h);

/* Ends the section: restores the mask it saved, if it blocked it. */
void sigmask_restore(const struct sigmask_hold *h);

/*
 * getpid(), read once per outermost section: the ownership checks of the
 * table and the pools (a vfork child must not use the parent's) cost one
 * system call per interposed call rather than one each. Inside a section
 * the process cannot change: a fork waits for every section's locks (the
 * fork guard, the table's stripes), and the shim never forks or vforks
 * inside one. The fork handlers, which run in a section across the fork,
 * call getpid() themselves, and the child's restore forgets the parent's.
 */
pid_t sigmask_getpid(void);

#endif /* GRAFT_SIGMASK_H */
