/*
 * The seccomp agent's per-call loop (seccomp_fast.c, built into
 * libgraft_seccomp.so) and the messages it exchanges with the broker.
 *
 * Python reads the region between FAST-BEGIN and FAST-END through cffi
 * (broker/seccomp/fast.py), so both sides use the compiler's layouts.
 * The kernel maps' layouts the loop reads (struct graft_mark, struct
 * graft_grant_key) are broker/confine/graft_maps.h's, the broker's too.
 */
#ifndef GRAFT_SECCOMP_FAST_H
#define GRAFT_SECCOMP_FAST_H

#include <stdint.h>

#include "../confine/graft_maps.h"

/* FAST-BEGIN */
/* Messages on the control socket (SOCK_SEQPACKET), one struct each. */
#define GRAFT_FAST_HANDOFF 1 /* loop -> broker: a notification for the broker to answer */
#define GRAFT_FAST_REFILL 2  /* loop -> broker: issue pre-issued sockets of `family` for `uid` */
#define GRAFT_FAST_POOL 3    /* broker -> loop: pre-issued sockets (SCM_RIGHTS; none: refused) */

#define GRAFT_FAST_POOL_MAX 64 /* sockets in one POOL message */
#define GRAFT_FAST_POOL_AGAIN 1 /* a POOL without sockets that is no refusal: no hold-off */
#define GRAFT_FAST_MAX_OPTS 64 /* entries of the option allowlist the loop reads */
#define GRAFT_FAST_NOTIF_SIZE 80 /* sizeof(struct seccomp_notif) */

struct graft_fast_msg {
    uint32_t kind;
    uint32_t family;   /* REFILL, POOL: AF_INET or AF_INET6; HANDOFF: 0 */
    uint32_t uid;      /* REFILL: the caller's effective uid; POOL: whose calls may use them */
    uint32_t grant_id; /* POOL: the grant id the sockets are marked with */
    uint32_t pid;      /* REFILL: the calling thread */
    uint32_t flags;    /* POOL: GRAFT_FAST_POOL_AGAIN */
    uint8_t notif[80]; /* HANDOFF: struct seccomp_notif, as received */
};

/* One entry of the socket-option allowlist (broker/core/sockopts.py ALLOWED). */
struct graft_fast_opt {
    int level;
    int name;
    int size;     /* bytes; at most 16 */
    int lock_bit; /* SO_BUF_LOCK bit that says the app fixed this size; 0: not a buffer size */
};

struct graft_fast_config {
    int notify_fd;
    int ctl_fd;
    int marks_fd;  /* SK_STORAGE: socket -> struct graft_mark */
    int grants_fd; /* HASH_OF_MAPS: grant id -> that tenant's grants */
    uint32_t arch; /* AUDIT_ARCH_* of the notified calls */
    int nr_connect;
    int nr_sendto;
    const struct graft_fast_opt *opts;
    uint32_t n_opts;
};

/* Counters the loop keeps for graft status (read without locks: each is one aligned word). */
struct graft_fast_stats {
    uint64_t continued;  /* answered "go on" by the loop */
    uint64_t installed;  /* connects given a pre-issued host socket by the loop */
    uint64_t handed_off; /* passed to the broker */
};

/* Serve cfg->notify_fd until every process of its filter is gone (0) or
 * the control socket closes (0); -errno when the notify fd fails. */
int graft_fast_serve(const struct graft_fast_config *cfg, struct graft_fast_stats *stats);
/* FAST-END */

#endif
