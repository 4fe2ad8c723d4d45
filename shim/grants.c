/*
 * grants.c: the cache of granted TCP destinations (see grants.h).
 *
 * GRANTS_SLOTS entries, direct-mapped by a hash of the destination. An
 * entry is a key of a few words guarded by a sequence number, odd while a
 * writer fills it (a seqlock): a reader copies the words and trusts them
 * only if the number was even and unchanged throughout. Every access is
 * atomic, so a torn read is merely discarded. Writers claim the entry by
 * making the number odd with a CAS; one that loses simply drops its
 * insert. A flush is one increment of the cache's epoch, which each entry
 * records: entries of an older epoch never match, so a flush needs no entry
 * to itself and cannot be held up by a writer.
 */
#include "grants.h"

#include <netinet/in.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define GRANTS_BITS 6
#define GRANTS_SLOTS (1u << GRANTS_BITS)
#define KEY_WORDS 6 /* family and port, 16 address bytes, scope id */

struct key {
    uint32_t w[KEY_WORDS];
};

struct entry {
    atomic_uint seq;
    atomic_uint epoch; /* 0: never valid */
    atomic_uint w[KEY_WORDS];
};

static struct entry cache[GRANTS_SLOTS];
static atomic_uint current_epoch = 1;

/* A non-zero family in the first word keeps an empty entry from matching anything. */
static bool make_key(const struct sockaddr *sa, struct key *k)
{
    memset(k, 0, sizeof *k);
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        k->w[0] = (uint32_t)AF_INET << 16 | in.sin_port;
        k->w[1] = in.sin_addr.s_addr;
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        k->w[0] = (uint32_t)AF_INET6 << 16 | in6.sin6_port;
        memcpy(&k->w[1], &in6.sin6_addr, sizeof in6.sin6_addr);
        k->w[5] = in6.sin6_scope_id;
        return true;
    }
    return false;
}

static struct entry *entry_for(const struct key *k)
{
    uint32_t h = 0;
    for (int i = 0; i < KEY_WORDS; i++)
        h = (h ^ k->w[i]) * 0x9e3779b1u; /* Fibonacci hashing: the top bits are well mixed */
    return &cache[h >> (32 - GRANTS_BITS)];
}

bool grants_has(const struct sockaddr *dest)
{
    struct key k;
    if (!make_key(dest, &k))
        return false;
    struct entry *e = entry_for(&k);
    unsigned int seq = atomic_load_explicit(&e->seq, memory_order_acquire);
    if (seq & 1)
        return false;
    bool same = atomic_load_explicit(&e->epoch, memory_order_relaxed) ==
                atomic_load_explicit(&current_epoch, memory_order_relaxed);
    for (int i = 0; i < KEY_WORDS; i++)
        same &= atomic_load_explicit(&e->w[i], memory_order_relaxed) == k.w[i];
    atomic_thread_fence(memory_order_acquire);
    return same && atomic_load_explicit(&e->seq, memory_order_relaxed) == seq;
}

void grants_add(const struct sockaddr *dest)
{
    struct key k;
    if (!make_key(dest, &k))
        return;
    struct entry *e = entry_for(&k);
    unsigned int seq = atomic_load_explicit(&e->seq, memory_order_relaxed);
    if ((seq & 1) || !atomic_compare_exchange_strong_explicit(&e->seq, &seq, seq + 1,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed))
        return;
    atomic_thread_fence(memory_order_release); /* the odd number is seen before any word */
    atomic_store_explicit(&e->epoch, atomic_load_explicit(&current_epoch, memory_order_relaxed),
                          memory_order_relaxed);
    for (int i = 0; i < KEY_WORDS; i++)
        atomic_store_explicit(&e->w[i], k.w[i], memory_order_relaxed);
    atomic_store_explicit(&e->seq, seq + 2, memory_order_release);
}

void grants_flush(void)
{
    unsigned int epoch = atomic_load(&current_epoch);
    while (!atomic_compare_exchange_weak(&current_epoch, &epoch, epoch + 1 != 0 ? epoch + 1 : 1))
        ;
}

/*
 * An entry a parent thread was writing at the fork stays odd in the child,
 * where that thread does not exist: invalidate it and make it usable again.
 */
void grants_fork_child(void)
{
    for (unsigned int i = 0; i < GRANTS_SLOTS; i++) {
        unsigned int seq = atomic_load_explicit(&cache[i].seq, memory_order_relaxed);
        if (seq & 1) {
            atomic_store_explicit(&cache[i].epoch, 0, memory_order_relaxed);
            atomic_store_explicit(&cache[i].seq, seq + 1, memory_order_release);
        }
    }
}
