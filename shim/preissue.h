/*
 * preissue.h: the pre-issued host sockets behind the connect fast path.
 *
 * The broker hands out, on request (PREISSUE in graft_wire.h), unconnected
 * host TCP sockets that the kernel lets connect only to destinations the
 * broker has already granted this tenant. With one in hand, a connect to a
 * destination this process has seen granted (grants.h) needs no broker
 * round trip: the shim connects the socket itself and installs it on the
 * app's fd as it would a graft (libgraft.c). The sockets wait in one
 * fdpool per family (fdpool.h, for fork, vfork, exec and fds the app
 * closed behind the shim's back). When a pool is down to what one refill
 * brings, a request for another goes out at once and its reply is collected
 * by a later take, without waiting (preissue.c has the states), so a
 * connect waits for the broker only when the pool has run dry: then for
 * the reply on its way, or for one round trip of its own. How many a
 * refill asks for follows how fast the process connects.
 *
 * Failures hold refills off for a while, doubling while they repeat, so
 * that a fast path that does not work costs connects next to nothing over
 * their usual round trip: a refill the broker refuses (a broker without
 * PREISSUE or without confinement, a tenant at its limits) or cannot
 * answer, and a pre-issued socket the kernel refuses twice in a row
 * without one connecting in between (the broker grants a destination it
 * could not enter in the kernel). A single refusal is the normal sign of
 * a policy reload or a broker restart and holds nothing off.
 */
#ifndef GRAFT_PREISSUE_H
#define GRAFT_PREISSUE_H

#include <stdbool.h>
#include <sys/types.h>

#include "forkguard.h"

/* Sets up the pools. Call once. */
void preissue_init(void);

/* What preissue_take hands out. */
struct preissued {
    int fd;           /* the socket, which the caller then owns; -1 for none */
    ino_t ino;        /* its inode, if it came from the pool (as checked there); 0: not known */
    unsigned int gen; /* the pools' generation it was taken in, for preissue_refused */
    int unreachable;  /* fd -1 because a refill found the broker unreachable: why (an errno) */
};

/*
 * A pre-issued socket of family (AF_INET or AF_INET6) for a TCP placeholder
 * of protocol (0 or IPPROTO_TCP); a pool getting low asks ahead, and an
 * empty one waits for what is on its way or refills with one round trip. No socket (fd -1) if the refill failed or is held off, another
 * thread is refilling, or the caller is a vfork/CLONE_VM child; unreachable
 * says when the broker could not be reached, so that the caller does not
 * try it a second time. Like any round trip, a refill is a cancellation
 * point.
 *
 * The caller holds the fork guard g (a refill releases it while it waits
 * for the broker): the socket is in no pool once taken, so the caller
 * installs or closes it before leaving the guard.
 */
struct preissued preissue_take(int family, int protocol, struct forkguard *g);

/*
 * Like preissue_take, but only a socket the pool holds now: no wait, no
 * round trip (a pool getting low still asks ahead). For socket(), which
 * takes one for a TCP socket of a process whose connects go the fast way,
 * so that the connect finds its host socket already on the app's fd.
 */
struct preissued preissue_take_ready(int family, int protocol, struct forkguard *g);

/* Whether a batch of the family ever came to this process: one atomic load, for socket(). */
bool preissue_in_use(int family);

/* A socket from preissue_take connected, or failed for another reason than the kernel's refusal. */
void preissue_connected(int family);

/*
 * The kernel refused a socket from preissue_take (EPERM): the tenant's
 * grants are gone (or were never entered), so every pooled socket is
 * closed, of both families, as possibly issued by a broker that is gone.
 * A refusal of a socket taken before the last such flush is that flush's
 * echo (threads that had taken one meanwhile) and counts for nothing.
 */
void preissue_refused(int family, unsigned int gen);

#endif /* GRAFT_PREISSUE_H */
