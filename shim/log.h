/*
 * log.h: the shim's only output: GRAFT_DEBUG decision lines and one-time
 * warnings, both on stderr.
 *
 * Each line is formatted into a stack buffer and written with a single
 * write(2), so lines from many threads and processes sharing one stderr do
 * not interleave. Neither function changes errno.
 */
#ifndef GRAFT_LOG_H
#define GRAFT_LOG_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>

/* "[ffff:ffff:...:255.255.255.255%4294967295]:65535" fits with room to spare. */
#define LOG_ADDRSTR_MAX 72

void log_init(bool debug);
bool log_debug_on(void);

/* "graft[<pid>]: <message>\n" when GRAFT_DEBUG=1. */
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * "graft: <message>\n", at most once per process for each *once flag. The
 * flag holds the pid that printed, so a fork child (a new process with a
 * copy of the flag) prints its own line.
 */
void log_once(_Atomic pid_t *once, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Thread-safe description of an errno value. */
const char *log_errstr(int err);

/* "1.2.3.4:80" or "[::1]:80" for an AF_INET/AF_INET6 address, else "?". */
void log_format_addr(char *buf, size_t size, const struct sockaddr *sa);

#endif /* GRAFT_LOG_H */
