/*
 * What kernel confinement keeps in its maps, laid out once for both sides:
 * the broker reads the region between MAPS-BEGIN and MAPS-END through cffi
 * (broker/confine/maps.py, which also builds the BPF programs' offsets and
 * the marks map's BTF from it), and the seccomp agent's C loop
 * (broker/seccomp/seccomp_fast.c) includes this header. tests/unit/
 * test_maps_layout.py checks that the compiler lays them out as cffi reads.
 */
#ifndef GRAFT_MAPS_H
#define GRAFT_MAPS_H

#include <stdint.h>

/* MAPS-BEGIN */
/* The mark a socket the broker handed out carries (the marks SK_STORAGE map).
 * port/ip4/ip6: the destination the broker connected it to, as
 * bpf_sock_addr's user_port (the be16 port in a u32), user_ip4, user_ip6.
 * tenant: the grant id of a pre-issued socket, or of a grafted UDP socket
 * whose later destinations its tenant's UDP grants decide (0 otherwise). */
struct graft_mark {
    uint32_t flags;
    uint32_t port;
    uint32_t ip4;
    uint32_t ip6[4];
    uint32_t tenant;
};

#define GRAFT_MARK_HAS_DEST 1
#define GRAFT_MARK_ANY_PEER 2
/* The destination has an IPv4 form (IPv4, or v4-mapped IPv6). Without it
 * the IPv4 programs match no destination: a dual-stack IPv6 UDP socket runs
 * them for an AF_INET address, and an ip4 of 0.0.0.0 would otherwise admit
 * 0.0.0.0, which the kernel delivers to 127.0.0.1. */
#define GRAFT_MARK_DEST_V4 4
/* Pre-issued: not connected by the broker; the first connect is judged by
 * the grants of the mark's tenant, and fixes the destination. */
#define GRAFT_MARK_PREISSUED 8

/* A key of a tenant's grants (an LRU hash, one per grant id). */
struct graft_grant_key {
    uint32_t tenant;
    uint32_t kind;    /* socket type << 16 | family */
    uint32_t port;    /* the be16 port in a u32, as bpf_sock_addr's user_port */
    uint8_t addr[16]; /* ip4 then zeros, or ip6, as the hook sees it */
};

struct graft_grant_value {
    uint32_t rule;    /* the broker's id of the rule that granted it */
    uint32_t expires; /* the CLOCK_MONOTONIC second it lapses at (a rule's `names`: the answer's TTL); 0: never */
};

/* One connect the kernel judged by a grant (the events ring: the fast path's audit). */
struct graft_event {
    uint32_t tenant;
    uint32_t rule;
    uint32_t pid;
    uint32_t uid;
    uint32_t family;
    uint8_t port[2]; /* network order */
    uint8_t pad[2];
    uint8_t addr[16];
};
/* A batch of pre-issued sockets being made (the stamps hash, keyed by the
 * making thread's pid_tgid as bpf_get_current_pid_tgid gives it): every
 * socket that thread creates meanwhile gets the mark and the count id at
 * creation, by the sock_create program, and `made` counts them. The broker
 * puts it in before the batch and takes it out after (confine/issue.c). */
struct graft_stamp {
    struct graft_mark mark;
    uint32_t count_id;
    uint32_t pad;
    uint64_t made;
};
/* MAPS-END */

/* The sizes the kernel's maps were created with (pinned maps outlive a broker): a change is a new layout. */
_Static_assert(sizeof(struct graft_mark) == 32, "the marks map's values (and its BTF) are 32 bytes");
_Static_assert(sizeof(struct graft_grant_key) == 28, "the grants maps' keys are 28 bytes");
_Static_assert(sizeof(struct graft_grant_value) == 8, "the grants maps' values are 8 bytes");
_Static_assert(sizeof(struct graft_event) == 40, "the events ring's records are 40 bytes");
_Static_assert(sizeof(struct graft_stamp) == 48, "the stamps map's values are 48 bytes");

#endif
