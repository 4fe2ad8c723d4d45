/*
 * sigmask.c: nested sections with every signal blocked (see sigmask.h).
 */
#define _GNU_SOURCE
#include "sigmask.h"

#include <pthread.h>
#include <unistd.h>

/*
 * initial-exec: the shim is loaded at start (LD_PRELOAD), so its TLS is in
 * the static block, and an access is a load off the thread pointer that
 * never allocates: safe in a signal handler, as every section must be.
 */
static __thread bool all_blocked __attribute__((tls_model("initial-exec")));
static __thread pid_t section_pid __attribute__((tls_model("initial-exec"))); /* 0: not read yet */

void sigmask_block_all(struct sigmask_hold *h)
{
    h->blocked = !all_blocked;
    if (!h->blocked)
        return;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &h->saved);
    all_blocked = true;
}

void sigmask_restore(const struct sigmask_hold *h)
{
    if (!h->blocked)
        return;
    all_blocked = false;
    section_pid = 0;
    pthread_sigmask(SIG_SETMASK, &h->saved, NULL);
}

pid_t sigmask_getpid(void)
{
    if (!all_blocked)
        return getpid();
    if (section_pid == 0)
        section_pid = getpid();
    return section_pid;
}
