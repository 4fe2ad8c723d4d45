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
 * Asks for pre-issued TCP sockets of family (graft_wire.h: PREISSUE), a
 * round trip like broker_roundtrip. Returns why the broker is unreachable,
 * or 0 when it answered: then either 1..GRAFT_PREISSUE_MAX unconnected,
 * non-blocking, O_CLOEXEC host sockets are in fds[0..*nfds), which the
 * caller owns, or *refused holds the errno of a DENY or ERROR verdict
 * (EOPNOTSUPP from a broker without PREISSUE or without confinement).
 * The fork guard g is held and released as by broker_roundtrip.
 */
int broker_preissue(int family, int protocol, int fds[GRAFT_PREISSUE_MAX], int *nfds, int *refused,
                    struct forkguard *g);

/*
 * Asks the broker to serve the tenant's resolver in this process's network
 * namespace (graft_wire.h: RESOLVER), on a connection of its own that is
 * closed after the reply. Returns why the broker is unreachable, or 0 with
 * *rep its validated reply. The fork guard g is held as by broker_roundtrip.
 */
int broker_announce(struct graft_reply *rep, struct forkguard *g);

/* Human-readable reason for a broker_roundtrip error. */
const char *broker_strerror(int err);

#endif /* GRAFT_BROKER_CONN_H */
