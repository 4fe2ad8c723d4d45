/*
 * The broker's per-socket work on the fast path, in C (libgraft_confine.so):
 * making pre-issued sockets (issue.c) and writing the kernel's audit
 * records of the connects it judged (kaudit.c).
 *
 * Python decides (how many sockets, for whom, marked with which grant id,
 * and what the audit records say of each tenant and rule); these functions
 * only carry it out, many sockets or records per call, because at tens of
 * thousands of connects a second Python's cost per socket and per record is
 * what limited the fast path (docs/benchmarks.md, issue 22). Both front-ends
 * use them through broker/core/grants.py: the shim's refills and the seccomp
 * loop's pools are made by one graft_issue.
 *
 * Python reads the region between CONFINE-BEGIN and CONFINE-END through cffi
 * (broker/confine/fastpath.py). The kernel's layouts (struct graft_mark,
 * struct graft_event) are graft_maps.h's.
 */
#ifndef GRAFT_CONFINE_H
#define GRAFT_CONFINE_H

#include <stddef.h>
#include <stdint.h>

/* CONFINE-BEGIN */
/* What graft_issue makes: n sockets of one kind, for one tenant, locked and counted. */
struct graft_issue_config {
    int family;
    int type;             /* SOCK_NONBLOCK and SOCK_CLOEXEC are added */
    int protocol;
    uint32_t owner_uid;   /* the sockets' owner: the thread's fsuid while they are made */
    int marks_fd;         /* SK_STORAGE: socket -> struct graft_mark */
    uint8_t mark[32];     /* the struct graft_mark every one of them gets */
    int guard_fd;         /* the listen guard, attached and locked on each */
    int counts_fd;        /* SK_STORAGE: socket -> count id (the kernel counts their closes) */
    uint32_t count_id;    /* the tenant's count id */
    int stamps_fd;        /* HASH: pid_tgid -> struct graft_stamp (the kernel marks and counts them); -1: none */
    int failed_locking;   /* out: graft_issue failed marking or counting them (else: making them) */
    int stamped;          /* out: the kernel marked and counted every one as it was created */
    int counted;          /* out, on failure: how many of those closed the kernel counted (their closes count) */
};

/* n sockets into fds: 0, or -errno and none made (every one made is closed). */
int graft_issue(struct graft_issue_config *config, int n, int *fds);

/* Close n fds (the broker's copies, once sent). */
void graft_issue_close(const int *fds, int n);

/* A grant id the kernel's records may carry, and what to write for it. */
struct graft_kaudit_tenant {
    uint32_t gid;
    uint32_t to_python; /* nonzero: its records are left to Python (a grant from a rule's `names` may be theirs) */
    const char *name;   /* the tenant's name as a JSON string, quotes included */
    uint64_t written;   /* records written for it (graft_kaudit_drain adds; the caller takes and resets) */
};

/* The events ring (BPF_MAP_TYPE_RINGBUF, mapped by the caller) and what its records are written with. */
struct graft_kaudit {
    uint64_t *consumer;       /* the consumer position (page 0: the only page userspace writes) */
    const uint64_t *producer; /* the producer position (page 1) */
    const uint8_t *data;      /* the data area, mapped twice in a row after page 1 */
    uint64_t mask;            /* the data area's size - 1 */
    struct graft_kaudit_tenant *tenants; /* sorted by gid */
    uint32_t n_tenants;
    const char *const *rules; /* rule ids -> the rule as a JSON string */
    uint32_t n_rules;
    const char *confinement;  /* "on" or "off", quotes included */
};

#define GRAFT_KAUDIT_EMPTY 0 /* every committed record is consumed */
#define GRAFT_KAUDIT_FULL 1  /* out has no room for the next record: call again */
#define GRAFT_KAUDIT_HELD 2  /* *held is the next record, consumed, for Python to write; call again */

/*
 * The ring's committed records, oldest first, as audit lines (broker/core/audit.py's
 * Record.to_json, byte for byte) into out, at most cap bytes; they are consumed.
 * Returns the bytes written; *lines the records among them; *stop why it stopped.
 */
size_t graft_kaudit_drain(struct graft_kaudit *k, char *out, size_t cap, uint32_t *lines, int *stop, void *held);
/* CONFINE-END */

#endif
