/*
 * fdtable.h: what the shim knows about each of the application's fds.
 *
 * socket() registers every TCP/UDP socket as a PLACEHOLDER: a real socket
 * in the container's stack that owns the fd number until the first
 * bind/connect/listen decides its fate. That decision runs without any lock
 * held across the broker round trip: the deciding thread *claims* the entry
 * (PLACEHOLDER -> BUSY), gets a snapshot of it, and later settles it with
 * the snapshot's generation number, which any close, reuse or re-creation of
 * the fd in the meantime changes.
 *
 * Safe from signal handlers and vfork children: fdt_drop and fdt_drop_range
 * (the close family) never allocate or free, hold a lock only with all
 * signals blocked, and leave the table alone in a process that does not own
 * it (a vfork/CLONE_VM child shares the parent's memory but not its fds).
 * Only fdt_track and fdt_adopt allocate (calloc, on first use of a page or
 * an fd number), so socket() from a signal handler is not async-signal-safe.
 */
#ifndef GRAFT_FDTABLE_H
#define GRAFT_FDTABLE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "graft_wire.h"

enum fdt_state {
    FDT_NONE = 0,    /* nothing known: untracked */
    FDT_PLACEHOLDER, /* container socket awaiting its first bind/connect/listen */
    FDT_BUSY,        /* a thread is deciding it (claimed) */
    FDT_NATIVE,      /* decided: stays in the container's stack */
    FDT_GRAFTED,     /* decided: the fd now refers to a host socket */
};

/* A placeholder as the shim recorded it; copied out by claims. */
struct fdt_sock {
    uint64_t gen;        /* identity of this use of the fd (filled in by the table) */
    int family;          /* AF_INET or AF_INET6 */
    int type;            /* SOCK_STREAM or SOCK_DGRAM */
    int protocol;
    bool bound;          /* bound natively to port 0; the real bind is deferred */
    socklen_t bound_len;
    uint8_t bound_addr[GRAFT_ADDR_MAX];
    uint32_t n_opts;
    struct graft_sockopt opts[GRAFT_MAX_OPTS];
};

enum fdt_claim {
    FDT_CLAIMED,   /* was a PLACEHOLDER; now BUSY and copied out */
    FDT_DECIDED,   /* tracked but not a placeholder: pass the call through */
    FDT_UNTRACKED, /* not tracked (or stale): the caller may try to adopt it */
};

enum fdt_opt {
    FDT_OPT_RECORDED,
    FDT_OPT_IGNORED,  /* not a placeholder */
    FDT_OPT_TOO_LONG, /* value longer than GRAFT_OPT_VAL_MAX */
    FDT_OPT_TOO_MANY, /* GRAFT_MAX_OPTS distinct options already recorded */
};

/* Records the owning process and installs the fork handlers. Call once. */
void fdt_init(void);

/* Whether fd can be tracked at all; larger fds simply pass through. */
bool fdt_in_range(int fd);

/* socket() created a placeholder on fd; replaces whatever was known. */
void fdt_track(int fd, ino_t ino, const struct fdt_sock *desc);

/*
 * Like fdt_track for a socket the shim did not see being created, but only
 * if nothing is known about fd, and it is returned claimed: desc->gen is
 * set. False if the fd is taken or cannot be tracked.
 */
bool fdt_adopt(int fd, ino_t ino, struct fdt_sock *desc);

/* setsockopt() succeeded on fd: remember the option if fd is a placeholder. */
enum fdt_opt fdt_record_opt(int fd, int level, int name, const void *val, socklen_t len);

/*
 * Claims fd if it is a placeholder. ino is the fd's current inode (fstat):
 * an entry with another inode is stale, left over from an fd closed behind
 * the shim's back, and is forgotten.
 */
enum fdt_claim fdt_claim(int fd, ino_t ino, struct fdt_sock *out);

/* Settles a claim (gen from the snapshot): BUSY -> state. */
void fdt_release(int fd, uint64_t gen, enum fdt_state state);

/* Settles a claim back to PLACEHOLDER, remembering a native bind to port 0. */
void fdt_release_bound(int fd, uint64_t gen, const void *addr, socklen_t len);

/*
 * Settles a claim as GRAFTED by running install(arg) (the dup3 onto fd)
 * under the entry's lock, so a concurrent close() of fd is ordered entirely
 * before it (then install is not run: EBADF) or after it. Returns 0 or an
 * errno value; if install fails, the entry is a PLACEHOLDER again.
 */
int fdt_commit(int fd, uint64_t gen, ino_t ino, int (*install)(void *), void *arg);

/* fd was closed or now refers to another file. Lock-free when untracked. */
void fdt_drop(int fd);

/* fdt_drop for every tracked fd in [first, last]. */
void fdt_drop_range(unsigned int first, unsigned int last);

#endif /* GRAFT_FDTABLE_H */
