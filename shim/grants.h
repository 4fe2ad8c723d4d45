/*
 * grants.h: the destinations the broker has granted this process's tenant
 * for TCP connects, as far as this process has seen: the connect fast path
 * (libgraft.c) takes a pre-issued socket only for one of these.
 *
 * A hint, never an authority: the kernel lets a pre-issued socket connect
 * only where the broker granted, whatever this cache says. An entry that
 * has gone stale costs one refused connect (EPERM), after which the caller
 * flushes the cache. Small and bounded (a direct-mapped table: a newer
 * destination evicts an older one), lock-free, and safe to use from signal
 * handlers and vfork children: readers never wait, and a writer that finds
 * an entry busy drops its insert.
 */
#ifndef GRAFT_GRANTS_H
#define GRAFT_GRANTS_H

#include <stdbool.h>
#include <sys/socket.h>

/* The fork-child handler (called by forkguard.c): entries left mid-write become usable. */
void grants_fork_child(void);

/*
 * dest is a whole sockaddr_in or sockaddr_in6; destinations are the same if
 * family, address, port and (IPv6) scope id are, whatever the flowinfo.
 */
void grants_add(const struct sockaddr *dest);
bool grants_has(const struct sockaddr *dest);

/* Forgets every destination. */
void grants_flush(void);

#endif /* GRAFT_GRANTS_H */
