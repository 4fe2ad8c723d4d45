/*
 * forkguard.h: fork() never copies into a child an fd the shim holds for
 * itself, and the shim's fork handlers run in one place, in one order.
 *
 * The shim's own fds wait in pools (fdpool.h: broker connections,
 * pre-issued sockets), and a fork child closes every pooled fd, idle or
 * lent. Some are briefly in no pool: a host socket between the recvmsg
 * that brings it and the dup3/close that puts it on the app's fd, a
 * pre-issued socket between its pool and the app's fd, a broker
 * connection being opened. A fork then would give the child a copy that
 * nothing in the child knows of, and so keep the parent's connection open
 * (its peer sees no FIN) until the child exits. O_CLOEXEC does not help:
 * a fork child need not exec.
 *
 * The fork guard closes that window. A thread deciding a socket holds it
 * shared for the whole decision, from the claim to the installed fd
 * (libgraft.c), and lets go only to wait for the broker, holding nothing
 * but pooled fds meanwhile (broker_conn.c). fork() takes it exclusively in
 * its prepare handler. So every fd of the shim's is, at every fork, either
 * pooled (the child closes it) or not yet received or already closed; and
 * a fork waits for a few system calls of each deciding thread, not for the
 * broker.
 *
 * Deadlock freedom:
 *   - It is taken before any other lock of the shim (fdtable.c's stripes),
 *     in the threads and in the prepare handler alike. Holding it, a
 *     thread waits only for those locks and for system calls: never for
 *     the app's locks, which a forking thread may hold, nor for libc's
 *     fork-time locks (malloc's, stdio's), which glibc takes only after
 *     the prepare handlers.
 *   - It is never taken twice by one thread (the interposers, which take
 *     it, are never called from inside the shim), so a writer-preferring
 *     lock, which keeps a fork from starving behind a stream of connects,
 *     cannot deadlock on a nested read lock.
 *   - Every signal is blocked while it is held: a signal handler that
 *     forks (or grafts) cannot run on a thread that holds it. Waits for the
 *     broker happen with it released, so signals arrive there as before.
 *   - The child, where the forking thread is the only one, gets a fresh,
 *     unlocked guard.
 *
 * No fork handler runs for vfork, posix_spawn or clone with CLONE_VM, and
 * none is needed: the child execs or exits, and every fd of the shim's is
 * O_CLOEXEC. It shares the parent's memory, guard included, but not its
 * fds, so it uses none of the parent's pools (fdpool.h); a graft in it
 * takes an unpooled connection and holds the guard for the round trip.
 * glibc's _Fork() and a raw clone() without CLONE_VM that never execs run
 * no handlers either, and are outside the shim's reach.
 */
#ifndef GRAFT_FORKGUARD_H
#define GRAFT_FORKGUARD_H

#include "sigmask.h"

/* One holding of the guard by one thread. */
struct forkguard {
    struct sigmask_hold mask; /* the thread's signal mask before forkguard_enter */
};

/* Installs the shim's fork handlers (the guard's, fdtable's, fdpool's, grants'). Call once. */
void forkguard_init(void);

/* Blocks every signal and takes the guard shared; a fork waits until forkguard_leave. */
void forkguard_enter(struct forkguard *g);

/* Releases the guard and restores the signal mask. */
void forkguard_leave(struct forkguard *g);

#endif /* GRAFT_FORKGUARD_H */
