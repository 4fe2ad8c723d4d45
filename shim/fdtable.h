/*
 * fdtable.h: what the shim knows about each of the application's fds.
 *
 * socket() registers every TCP/UDP socket as a PLACEHOLDER: a real socket
 * in the container's stack that owns the fd number until the first
 * bind/connect/listen decides its fate (or, for a TCP socket of a process
 * whose connects take the fast way, a pre-issued host socket: on_host, see
 * fdt_replace). That decision runs without any lock
 * held across the broker round trip: the deciding thread *claims* the entry
 * (PLACEHOLDER -> BUSY), gets a snapshot of it, and later settles it with
 * the snapshot's generation number, which any close, reuse or re-creation of
 * the fd in the meantime changes.
 *
 * Duplicates (dup, dup2, dup3, fcntl F_DUPFD*) of an undecided placeholder
 * refer to the same socket, so their entries are linked in a ring that
 * shares one fate: claiming any of them claims all, and a graft puts the
 * host socket on every fd number in the ring (see fdt_commit). Duplicates
 * of a decided fd get a copy of its entry.
 *
 * Safe from signal handlers and vfork children: fdt_drop and fdt_drop_range
 * (the close family) never allocate or free, hold a lock only with all
 * signals blocked, and leave the table alone in a process that does not own
 * it (a vfork/CLONE_VM child shares the parent's memory but not its fds).
 * Only fdt_track, fdt_adopt and fdt_dup allocate (calloc, on first use of a
 * page or an fd number), so socket(), and dup of a *tracked* socket, from a
 * signal handler are not async-signal-safe; dup2 of any other fd (the usual
 * case in handlers and fork children) only does a lock-free lookup.
 */
#ifndef GRAFT_FDTABLE_H
#define GRAFT_FDTABLE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>
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
    bool on_host;        /* the placeholder is a pre-issued host socket (see fdt_replace) */
    unsigned int pool_gen; /* on_host: the pools' generation it was taken in (preissue.h) */
    bool bound;          /* bound natively to port 0; the real bind is deferred */
    socklen_t bound_len;
    uint8_t bound_addr[GRAFT_ADDR_MAX];
    uint32_t n_opts;
    struct graft_sockopt opts[GRAFT_MAX_OPTS];
};

/*
 * A grafted socket whose host address differs from the address the app
 * bound (a bind rule with `host`): getsockname translates it back.
 */
struct fdt_names {
    socklen_t len;                /* size of both addresses */
    uint8_t app[GRAFT_ADDR_MAX];  /* what the app passed to bind() */
    uint8_t host[GRAFT_ADDR_MAX]; /* what the host socket is bound to */
};

/*
 * The epoll registrations of one undecided fd number. epoll keys a
 * registration by file and fd number, so putting the host socket on the
 * number drops it with the placeholder's file; a graft makes each again on
 * the host socket (event loops such as nginx's register a socket before
 * they connect it).
 */
#define FDT_MAX_POLLS 4
struct fdt_poll {
    int epfd;
    struct epoll_event event;
};
struct fdt_polls {
    unsigned int n;
    struct fdt_poll at[FDT_MAX_POLLS];
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

/* Records the owning process. Call once. */
void fdt_init(void);

/*
 * The fork handlers, called by forkguard.c with every signal blocked:
 * prepare takes every lock of the table, parent releases them, child also
 * makes the child the table's owner.
 */
void fdt_fork_prepare(void);
void fdt_fork_parent(void);
void fdt_fork_child(void);

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

/*
 * epoll_ctl(epfd, op, fd, event) made with real, remembered if fd is
 * undecided (and there is room: FDT_MAX_POLLS epoll instances). Under the
 * entry's lock, so that a graft of fd is ordered entirely before the call
 * (which then registers the host socket) or after it (and registers again).
 * Returns what real returns, with its errno; *unrecorded says whether a
 * registration of an undecided fd found no room (a graft will not move it).
 */
typedef int (*fdt_epoll_fn)(int epfd, int op, int fd, struct epoll_event *event);
int fdt_epoll_ctl(int epfd, int op, int fd, struct epoll_event *event, fdt_epoll_fn real, bool *unrecorded);

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
 * Puts the host socket on one fd number (the dup3); placeholder_ino is the
 * inode the entry expects on that fd now, polls its epoll registrations.
 * Returns 0 or an errno value.
 */
typedef int (*fdt_install_fn)(int fd, ino_t placeholder_ino, const struct fdt_polls *polls, void *arg);

/*
 * Settles a claim as GRAFTED by running install on fd, and then on every
 * other fd in its ring, under the entries' locks, so a concurrent close()
 * of any of them is ordered entirely before it (that fd is then skipped;
 * for fd itself: EBADF) or after it. ino is the host socket's inode; names,
 * if not NULL, is recorded for getsockname. Returns 0 or an errno value: if
 * install fails on fd, the ring is PLACEHOLDER again; a duplicate it fails
 * on is forgotten (it keeps the placeholder and is adopted again later).
 */
int fdt_commit(int fd, uint64_t gen, ino_t ino, const struct fdt_names *names,
               fdt_install_fn install, void *arg);

/*
 * A placeholder may be a pre-issued host socket rather than a container
 * socket (on_host: socket() took one from the pool, libgraft.c), so that a
 * fast-path connect connects it where it is. Any other decision needs the
 * container socket first: fdt_replace puts it, inode ino, on fd and every
 * other fd in its ring, like fdt_commit, but the claim goes on, with
 * on_host cleared. Returns 0 or an errno value (the ring is unchanged if
 * install fails on fd; a duplicate it fails on is forgotten).
 */
int fdt_replace(int fd, uint64_t gen, ino_t ino, fdt_install_fn install, void *arg);

/*
 * Claims again an fd this thread settled GRAFTED under claim gen (a
 * connect in place the kernel refused): GRAFTED -> BUSY, copied out to
 * out. False if the fd was closed or reused since. (A duplicate made
 * meanwhile is a copy of a decided entry and keeps the refused socket.)
 */
bool fdt_reclaim(int fd, uint64_t gen, struct fdt_sock *out);

/* Lock-free hints: fd is a placeholder now / a host one / is tracked at all (claim to be sure). */
bool fdt_is_placeholder(int fd);
bool fdt_is_host_placeholder(int fd);
bool fdt_is_tracked(int fd);

/*
 * fd is GRAFTED and still the socket of inode ino (its host socket's):
 * copies its description, as socket() recorded it, to out. False for any
 * other fd, and for an entry left stale by a close behind the shim's back.
 * Takes the entry's lock: for rare paths (a send the kernel refused).
 */
bool fdt_get_grafted(int fd, ino_t ino, struct fdt_sock *out);

/* The names of a grafted fd whose host address was translated; false if none. */
bool fdt_get_names(int fd, struct fdt_names *out);

/*
 * newfd (whose inode is ino) was made a duplicate of oldfd by dup, dup2,
 * dup3 or fcntl(F_DUPFD*): newfd joins oldfd's ring if that is undecided,
 * or gets a copy of its decided entry. Nothing happens if oldfd is
 * untracked or its entry is stale (another inode).
 */
void fdt_dup(int oldfd, int newfd, ino_t ino);

/* fd was closed or now refers to another file. Lock-free when untracked. */
void fdt_drop(int fd);

/* fdt_drop for every tracked fd in [first, last]. */
void fdt_drop_range(unsigned int first, unsigned int last);

#endif /* GRAFT_FDTABLE_H */
