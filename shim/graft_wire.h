/*
 * graft_wire.h: the one definition of the shim <-> broker wire format.
 *
 * libgraft.so includes this header; the broker parses the region between
 * the WIRE-BEGIN and WIRE-END markers with cffi (broker/shim/wire.py), so both
 * sides read the same struct layout and constants and cannot drift apart.
 * Keep that region free of preprocessor logic other than integer #defines:
 * cffi's cdef parser accepts nothing else.
 *
 * Transport: an AF_UNIX SOCK_SEQPACKET connection to <socket_dir>/<tenant>.sock.
 * Each request and each reply is exactly one message of exactly the size of
 * its struct; the kernel keeps message boundaries, so a short, long or
 * truncated message is detected without any framing code. A GRAFT reply
 * carries the host socket as one SCM_RIGHTS fd. All integers are in host
 * byte order (both ends run on the same machine); addresses are the raw
 * struct sockaddr_in / sockaddr_in6 bytes the application passed.
 *
 * PREISSUE (the connect fast path, docs/architecture.md): the request names
 * family, type (SOCK_STREAM) and protocol, with addr_len 0 and no options;
 * its flags may say how many sockets are wanted (GRAFT_PREISSUE_WANT: 1..
 * GRAFT_PREISSUE_MAX, 0 for as many as the broker gives). A GRAFT reply
 * carries 1..GRAFT_PREISSUE_MAX (at most as many as wanted) unconnected host
 * sockets, each locked by the kernel so that its first connect() succeeds
 * only to a destination the broker has already granted this tenant (a GRAFT
 * reply to a TCP connect); anywhere else it fails with EPERM. Any other
 * verdict carries no fd.
 *
 * GRANT (UDP's later destinations): the app already holds a grafted UDP
 * socket, and the kernel refused (EPERM) a sendto/sendmsg to a destination
 * no socket of this tenant was granted before. The request names the
 * socket's family, type (SOCK_DGRAM) and protocol, the destination in the
 * socket's own family (v4-mapped for an AF_INET destination of an AF_INET6
 * socket, as for a first sendto), flags GRAFT_REQF_SENDTO and no options.
 * The broker judges it as that sendto's connect. A GRAFT reply carries no
 * fd: the kernel now lets the tenant's grafted UDP sockets send there, so
 * the call may be made again. DENY or ERROR: the call fails with error.
 *
 * RESOLVER (names, docs/dns.md): sent by `graft run` from inside the
 * network namespace its program will run in, before the program starts,
 * and by the shim as it loads into a process; family AF_INET, type
 * SOCK_DGRAM, no flags, address or options. The
 * broker serves the tenant's resolver in the sender's namespace (it knows
 * it from the sender's pid) for as long as the sender, or another that
 * asked there, lives. A GRAFT reply names the resolver's address (port
 * 53), to write into the program's resolv.conf; CONTAINER: none is
 * served (dns.resolver = "off", or the sender runs in the broker's or the
 * tenant's own namespace); ERROR: it could not be served, with errno.
 */
#ifndef GRAFT_WIRE_H
#define GRAFT_WIRE_H

#include <stdint.h>

/* WIRE-BEGIN */
#define GRAFT_WIRE_MAGIC   0x47524654
#define GRAFT_WIRE_VERSION 1
#define GRAFT_MAX_OPTS     16
#define GRAFT_OPT_VAL_MAX  16
#define GRAFT_ADDR_MAX     28

/* Request ops. */
#define GRAFT_OP_CONNECT 1
#define GRAFT_OP_BIND    2
#define GRAFT_OP_PREISSUE 3  /* unconnected TCP sockets ahead of time: see below */
#define GRAFT_OP_GRANT   4   /* a new destination for a grafted UDP socket: see below */
#define GRAFT_OP_RESOLVER 5  /* serve the tenant's resolver in my network namespace: see below */

/*
 * Sockets one PREISSUE reply carries at most: below the want field's 255
 * and the kernel's SCM_MAX_FD (253). A pool that asks ahead at one batch
 * left (preissue.c) keeps 64 connects of runway while its refill is on its
 * way, which covers the broker's slow round trips on a loaded machine.
 * 128 took ~1 µs off the broker's CPU per fast-path connect but cost the
 * one-process connect rate more (docs/benchmarks.md, "Batches of 128").
 */
#define GRAFT_PREISSUE_MAX 64

/* Request flags. */
#define GRAFT_REQF_SENDTO 1   /* a connect judged for a sendto/sendmsg destination */
/* PREISSUE: the sockets wanted, (flags & GRAFT_PREISSUE_WANT_MASK) >> GRAFT_PREISSUE_WANT_SHIFT. */
#define GRAFT_PREISSUE_WANT_SHIFT 8
#define GRAFT_PREISSUE_WANT_MASK 0xff00

/* Reply verdicts. */
#define GRAFT_V_GRAFT     1   /* fd attached; error = errno of the broker's connect/bind (0 or EINPROGRESS) */
#define GRAFT_V_CONTAINER 2   /* do the call natively on the placeholder, in the container's stack */
#define GRAFT_V_DENY      3   /* fail the call with errno = error */
#define GRAFT_V_ERROR     4   /* the request was refused as malformed or could not be served; errno = error */

/* One socket option the application set before bind/connect. */
struct graft_sockopt {
    int32_t level;
    int32_t name;
    uint32_t len;
    uint8_t val[GRAFT_OPT_VAL_MAX];
};

struct graft_request {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    int32_t family;         /* AF_INET or AF_INET6 */
    int32_t type;           /* SOCK_STREAM or SOCK_DGRAM, without SOCK_NONBLOCK/SOCK_CLOEXEC */
    int32_t protocol;
    uint32_t flags;         /* GRAFT_REQF_* */
    uint32_t addr_len;
    uint8_t addr[GRAFT_ADDR_MAX];
    uint32_t n_opts;
    struct graft_sockopt opts[GRAFT_MAX_OPTS];
};

struct graft_reply {
    uint32_t magic;
    uint16_t version;
    uint16_t verdict;       /* GRAFT_V_* */
    int32_t error;
    uint32_t addr_len;      /* GRAFT on bind: the address the broker bound on the host */
    uint8_t addr[GRAFT_ADDR_MAX];
};
/* WIRE-END */

#endif /* GRAFT_WIRE_H */
