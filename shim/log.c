/*
 * log.c: stderr output of the shim (see log.h).
 *
 * Formatting uses vsnprintf, which glibc implements without locks or
 * allocation for the integer and string conversions used here; it is still
 * not formally async-signal-safe, which only matters with GRAFT_DEBUG=1 or
 * on the one-time warning path.
 */
#define _GNU_SOURCE
#include "log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define LINE_MAX_BYTES 512

static bool debug_enabled;

void log_init(bool debug)
{
    debug_enabled = debug;
}

bool log_debug_on(void)
{
    return debug_enabled;
}

/*
 * Appends fmt after the prefix already in line[0..prefix) and writes the
 * line in one go, cut short rather than split if it is too long.
 */
static void emit(char *line, int prefix, const char *fmt, va_list ap)
{
    int saved = errno;
    size_t len = prefix > 0 && prefix < LINE_MAX_BYTES ? (size_t)prefix : 0;
    int n = vsnprintf(line + len, LINE_MAX_BYTES - len, fmt, ap);

    if (n > 0)
        len += (size_t)n < LINE_MAX_BYTES - len - 1 ? (size_t)n : LINE_MAX_BYTES - len - 1;
    line[len++] = '\n'; /* over the terminating NUL: len <= LINE_MAX_BYTES */
    if (write(STDERR_FILENO, line, len) < 0) {
        /* stderr is gone; the shim has no other channel. */
    }
    errno = saved;
}

void log_debug(const char *fmt, ...)
{
    if (!debug_enabled)
        return;
    char line[LINE_MAX_BYTES];
    va_list ap;
    va_start(ap, fmt);
    emit(line, snprintf(line, sizeof line, "graft[%d]: ", (int)getpid()), fmt, ap);
    va_end(ap);
}

void log_once(_Atomic pid_t *once, const char *fmt, ...)
{
    int saved = errno;
    pid_t me = getpid();
    errno = saved;
    if (atomic_exchange(once, me) == me)
        return;
    char line[LINE_MAX_BYTES];
    va_list ap;
    va_start(ap, fmt);
    emit(line, snprintf(line, sizeof line, "graft: "), fmt, ap);
    va_end(ap);
}

const char *log_errstr(int err)
{
#ifdef __GLIBC__
    /* Unlike strerror(), returns constant strings: no shared buffer. */
    const char *s = strerrordesc_np(err);
#else
    /* musl's strerror() returns constant strings already (and has no strerrordesc_np). */
    const char *s = strerror(err);
#endif
    return s != NULL ? s : "Unknown error";
}

void log_format_addr(char *buf, size_t size, const struct sockaddr *sa)
{
    char host[INET6_ADDRSTRLEN];
    int saved = errno;

    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        inet_ntop(AF_INET, &in.sin_addr, host, sizeof host);
        snprintf(buf, size, "%s:%u", host, ntohs(in.sin_port));
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        inet_ntop(AF_INET6, &in6.sin6_addr, host, sizeof host);
        if (in6.sin6_scope_id != 0)
            snprintf(buf, size, "[%s%%%u]:%u", host, in6.sin6_scope_id, ntohs(in6.sin6_port));
        else
            snprintf(buf, size, "[%s]:%u", host, ntohs(in6.sin6_port));
    } else {
        snprintf(buf, size, "?");
    }
    errno = saved;
}
