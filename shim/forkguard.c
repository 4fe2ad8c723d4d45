/*
 * forkguard.c: the fork guard and the shim's one set of fork handlers (see
 * forkguard.h).
 *
 * pthread_atfork runs prepare handlers in the reverse order of their
 * registration and the others in order, so handlers registered module by
 * module would be ordered by whichever module happened to initialise
 * first. The order matters here: the guard must be taken before
 * fdtable.c's locks, since a thread holding the guard may be waiting for
 * one of them. So this file registers one handler of each kind and calls
 * the modules' in order. With the guard held across the fork, no thread
 * was between receiving an fd and pooling, installing or closing it: in
 * the child, the pools hold every fd of the shim's, and emptying them
 * leaves none.
 */
#define _GNU_SOURCE
#include "forkguard.h"

#include <pthread.h>

#include "fdpool.h"
#include "fdtable.h"
#include "grants.h"

/*
 * Writer-preferring: with readers preferred, threads connecting in a loop
 * could keep a fork waiting indefinitely. Safe because no thread takes the
 * guard twice (forkguard.h).
 */
#ifdef PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
#define GUARD_INITIALIZER PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
#else
/* musl has no writer-preferring kind: its rwlock lets new readers in while a writer waits. */
#define GUARD_INITIALIZER PTHREAD_RWLOCK_INITIALIZER
#endif
static pthread_rwlock_t guard = GUARD_INITIALIZER;

/* The forking thread's own holding, from prepare to parent/child. */
static struct forkguard forking;

void forkguard_enter(struct forkguard *g)
{
    sigmask_block_all(&g->mask); /* the fd table's locks inside then leave the mask alone */
    pthread_rwlock_rdlock(&guard);
}

void forkguard_leave(struct forkguard *g)
{
    pthread_rwlock_unlock(&guard);
    sigmask_restore(&g->mask);
}

static void prepare(void)
{
    struct sigmask_hold mask;
    sigmask_block_all(&mask);
    pthread_rwlock_wrlock(&guard);
    forking.mask = mask; /* written only while holding the guard exclusively */
    fdt_fork_prepare();
}

static void parent(void)
{
    fdt_fork_parent();
    forkguard_leave(&forking);
}

/*
 * The forking thread is the child's only thread. glibc records a write
 * lock's owner by thread id, which the child's thread no longer has, so
 * the child starts from a fresh guard rather than unlocking the old one.
 */
static void child(void)
{
    fdt_fork_child();
    fdpool_fork_child();
    grants_fork_child();
    guard = (pthread_rwlock_t)GUARD_INITIALIZER;
    sigmask_restore(&forking.mask); /* also clears the child's copy of the thread's "all blocked" */
}

void forkguard_init(void)
{
    pthread_atfork(prepare, parent, child);
}
