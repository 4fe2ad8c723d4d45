/*
 * broker_conn.h: the shim's connections to graft-broker, and one
 * request/reply round trip over them.
 *
 * Connections are AF_UNIX SOCK_SEQPACKET sockets to $GRAFT_SOCKET, kept in a
 * small lock-free pool so that many threads can graft at once. A pooled
 * connection is only ever used by the process that opened it.
 */
#ifndef GRAFT_BROKER_CONN_H
#define GRAFT_BROKER_CONN_H

#include <stdbool.h>

#include "forkguard.h"
#include "graft_wire.h"

/* Seconds a connect/send/receive to the broker may take. */
#define BROKER_TIMEOUT_SEC 10

/* Sets the broker's socket path and the connection pool. Call once. */
void broker_init(const char *path);

/* The socket path, for messages. */
const char *broker_path(void);

/*
 * Sends req (a CONNECT, BIND or GRANT) and receives a validated reply.
 * Returns 0, with *hostfd the fd attached to a GRAFT reply to a CONNECT or
 * BIND (O_CLOEXEC; the caller owns it) or -1 (any other reply: a GRAFT to
 * a GRANT carrying an fd is invalid); or an errno value saying why the
 * broker is unreachable, EPROTO for an invalid reply (the reply is then
 * unset and no fd is returned). A failed pooled connection is retried once
 * on a fresh one. Its send and receive are cancellation points: a caller
 * holding state that a cancellation would leak must disable cancellation.
 *
 * The caller holds the fork guard g, which is released while the round
 * trip waits for the broker and held again when it returns: *hostfd
 * arrives inside it, and the caller installs or closes it before leaving.
 */
int broker_roundtrip(const struct graft_request *req, struct graft_reply *rep, int *hostfd,
                     struct forkguard *g);

/*
 * Asks for want (1..GRAFT_PREISSUE_MAX) pre-issued TCP sockets of family
 * (graft_wire.h: PREISSUE), a round trip like broker_roundtrip. Returns why
 * the broker is unreachable, or 0 when it answered: then either 1..want unconnected,
 * non-blocking, O_CLOEXEC host sockets are in fds[0..*nfds), which the
 * caller owns, or *refused holds the errno of a DENY or ERROR verdict
 * (EOPNOTSUPP from a broker without PREISSUE or without confinement).
 * The fork guard g is held and released as by broker_roundtrip.
 */
int broker_preissue(int family, int protocol, int want, int fds[GRAFT_PREISSUE_MAX], int *nfds, int *refused,
                    struct forkguard *g);

/*
 * The same request, in two halves, so that no thread waits for it while
 * sockets are left (preissue.c asks ahead of an empty pool). _send borrows
 * a pooled connection (or opens one), sends the request (want:
 * 1..GRAFT_PREISSUE_MAX) and records the connection in *pending; it stays
 * lent from the connection pool, so a fork child closes it. 0, or why not
 * (EAGAIN: the pool is full). _collect takes the reply: without wait,
 * EAGAIN if it has not come yet (the request stays pending); otherwise, and
 * after any other outcome, the connection goes back to the pool (or is
 * closed, after a failure), and the result is broker_preissue's.
 * _drop gives a pending request up. The fork guard is held by the caller,
 * and released only while _collect waits.
 */
struct broker_pending {
    int fd;
    int slot;
};
int broker_preissue_send(int family, int protocol, int want, struct broker_pending *pending, struct forkguard *g);
int broker_preissue_collect(const struct broker_pending *pending, bool wait, int fds[GRAFT_PREISSUE_MAX], int *nfds,
                            int *refused, struct forkguard *g);
void broker_pending_drop(const struct broker_pending *pending);

/*
 * Asks the broker to serve the tenant's resolver in this process's network
 * namespace (graft_wire.h: RESOLVER), on a connection of its own that is
 * closed after the reply, or, without wait, right after the request (the
 * broker serves it all the same; *rep is then unset). Returns why the
 * broker is unreachable, or 0 with *rep its validated reply. The fork
 * guard g is held as by broker_roundtrip.
 */
int broker_announce(struct graft_reply *rep, bool wait, struct forkguard *g);

/* Human-readable reason for a broker_roundtrip error. */
const char *broker_strerror(int err);

#endif /* GRAFT_BROKER_CONN_H */
