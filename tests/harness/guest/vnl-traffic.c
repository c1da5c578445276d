/*
 * vnl-traffic: tiny traffic generator for the vm_network_latency test lab.
 *
 * Built with `gcc -static -O2` so it runs inside the busybox guest (it is put
 * in the guest's initramfs as /bin/vnl-traffic) and on the host alike.
 *
 *   vnl-traffic udp DST DPORT COUNT SPORT [GAP_US] [PAYLOAD_BYTES]
 *       bind SPORT, send COUNT datagrams to DST:DPORT with GAP_US microseconds
 *       between sends (default 0) and PAYLOAD_BYTES of payload (default 64);
 *       prints "sent N".
 *
 *   vnl-traffic tcp DST DPORT MSGS SPORT [PAYLOAD_BYTES]
 *       bind SPORT (SO_REUSEADDR), connect, TCP_NODELAY; for each of MSGS send
 *       a PAYLOAD_BYTES message (default 64) and read the echo back fully,
 *       then close; prints "exchanged N".
 *
 * Exits non-zero with a message on stderr on any error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD 65507

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("vnl-traffic: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: vnl-traffic udp DST DPORT COUNT SPORT [GAP_US] [PAYLOAD_BYTES]\n"
		"       vnl-traffic tcp DST DPORT MSGS SPORT [PAYLOAD_BYTES]\n");
	exit(2);
}

static long parse_num(const char *s, const char *what, long min, long max)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end != '\0' || v < min || v > max)
		die("invalid %s '%s' (expected %ld..%ld)", what, s, min, max);
	return v;
}

/* IPv4 or IPv6, by the address's form */
static socklen_t make_addr(struct sockaddr_storage *ss, const char *ip, long port)
{
	struct sockaddr_in *sa = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *sa6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, ip, &sa->sin_addr) == 1) {
		sa->sin_family = AF_INET;
		sa->sin_port = htons((unsigned short)port);
		return sizeof(*sa);
	}
	if (inet_pton(AF_INET6, ip, &sa6->sin6_addr) == 1) {
		sa6->sin6_family = AF_INET6;
		sa6->sin6_port = htons((unsigned short)port);
		return sizeof(*sa6);
	}
	die("invalid IPv4 or IPv6 address '%s'", ip);
	return 0;
}

static int bound_socket(int family, int type, long sport)
{
	struct sockaddr_storage local;
	int one = 1;
	int fd = socket(family, type, 0);
	socklen_t len;

	if (fd < 0)
		die("socket: %s", strerror(errno));
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		die("setsockopt SO_REUSEADDR: %s", strerror(errno));
	len = make_addr(&local, family == AF_INET6 ? "::" : "0.0.0.0", sport);
	if (bind(fd, (struct sockaddr *)&local, len) < 0)
		die("bind port %ld: %s", sport, strerror(errno));
	return fd;
}

static void sleep_us(long us)
{
	struct timespec ts;

	if (us <= 0)
		return;
	ts.tv_sec = us / 1000000;
	ts.tv_nsec = (us % 1000000) * 1000;
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void fill_payload(char *buf, long len, long seq)
{
	long i;

	for (i = 0; i < len; i++)
		buf[i] = (char)('a' + (i + seq) % 26);
	if (len >= 8)
		snprintf(buf, 8, "%07ld", seq % 10000000);
}

static int do_udp(int argc, char **argv)
{
	struct sockaddr_storage dst;
	socklen_t dlen;
	long dport, count, sport, gap = 0, plen = 64, i;
	char *buf;
	int fd;

	if (argc < 6 || argc > 8)
		usage();
	dport = parse_num(argv[3], "DPORT", 1, 65535);
	count = parse_num(argv[4], "COUNT", 0, LONG_MAX);
	sport = parse_num(argv[5], "SPORT", 0, 65535);
	if (argc > 6)
		gap = parse_num(argv[6], "GAP_US", 0, 3600L * 1000000L);
	if (argc > 7)
		plen = parse_num(argv[7], "PAYLOAD_BYTES", 0, MAX_PAYLOAD);
	dlen = make_addr(&dst, argv[2], dport);

	buf = malloc(plen ? plen : 1);
	if (!buf)
		die("out of memory");
	fd = bound_socket(dst.ss_family, SOCK_DGRAM, sport);
	for (i = 0; i < count; i++) {
		ssize_t n;

		fill_payload(buf, plen, i);
		for (;;) {
			n = sendto(fd, buf, plen, 0, (struct sockaddr *)&dst, dlen);
			if (n >= 0)
				break;
			/* local queue full: wait a little and retry, do not drop */
			if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) {
				sleep_us(100);
				continue;
			}
			die("sendto %s:%ld (datagram %ld): %s", argv[2], dport, i, strerror(errno));
		}
		if (n != plen)
			die("short send: %zd of %ld bytes", n, plen);
		if (gap && i + 1 < count)
			sleep_us(gap);
	}
	close(fd);
	free(buf);
	printf("sent %ld\n", count);
	return 0;
}

static void write_all(int fd, const char *buf, long len)
{
	while (len > 0) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("send: %s", strerror(errno));
		}
		buf += n;
		len -= n;
	}
}

static void read_all(int fd, char *buf, long len)
{
	while (len > 0) {
		ssize_t n = recv(fd, buf, len, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recv: %s", strerror(errno));
		}
		if (n == 0)
			die("connection closed by peer before the echo was complete");
		buf += n;
		len -= n;
	}
}

static int do_tcp(int argc, char **argv)
{
	struct sockaddr_storage dst;
	socklen_t dlen;
	long dport, msgs, sport, plen = 64, i;
	char *out, *in;
	int fd, one = 1;

	if (argc < 6 || argc > 7)
		usage();
	dport = parse_num(argv[3], "DPORT", 1, 65535);
	msgs = parse_num(argv[4], "MSGS", 0, LONG_MAX);
	sport = parse_num(argv[5], "SPORT", 0, 65535);
	if (argc > 6)
		plen = parse_num(argv[6], "PAYLOAD_BYTES", 1, 16 * 1024 * 1024);
	dlen = make_addr(&dst, argv[2], dport);

	out = malloc(plen);
	in = malloc(plen);
	if (!out || !in)
		die("out of memory");
	fd = bound_socket(dst.ss_family, SOCK_STREAM, sport);
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		die("setsockopt TCP_NODELAY: %s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&dst, dlen) < 0)
		die("connect %s:%ld: %s", argv[2], dport, strerror(errno));
	for (i = 0; i < msgs; i++) {
		fill_payload(out, plen, i);
		write_all(fd, out, plen);
		read_all(fd, in, plen);
		if (memcmp(in, out, plen) != 0)
			die("echo mismatch in message %ld", i);
	}
	if (close(fd) < 0)
		die("close: %s", strerror(errno));
	free(out);
	free(in);
	printf("exchanged %ld\n", msgs);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "udp") == 0)
		return do_udp(argc, argv);
	if (strcmp(argv[1], "tcp") == 0)
		return do_tcp(argc, argv);
	usage();
	return 2;
}
