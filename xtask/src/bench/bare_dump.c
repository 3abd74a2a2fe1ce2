/*
 * The floor for `ctwatch snapshot`: one ctnetlink dump of the calling
 * thread's network namespace (IPCTNL_MSG_CT_GET, NLM_F_DUMP, AF_UNSPEC on
 * NETLINK_NETFILTER) that counts the messages and decodes nothing.
 * `cargo xtask bench` compiles it with `cc -O2` and runs it inside the
 * namespace. Prints `entries N bytes B`.
 */
#include <errno.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Dump skbs grow to 32 KiB once the reader offers that much. */
static char buf[1 << 16];

int main(void)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
	if (fd < 0) {
		perror("socket");
		return 1;
	}
	struct {
		struct nlmsghdr nh;
		struct nfgenmsg nf;
	} req;
	memset(&req, 0, sizeof(req));
	req.nh.nlmsg_len = sizeof(req);
	req.nh.nlmsg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
	req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	req.nh.nlmsg_seq = 1;
	req.nf.nfgen_family = AF_UNSPEC;
	req.nf.version = NFNETLINK_V0;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	if (sendto(fd, &req, sizeof(req), 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
		perror("sendto");
		return 1;
	}
	unsigned long entries = 0, bytes = 0;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("recv");
			return 1;
		}
		bytes += n;
		int len = (int)n;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
			if (h->nlmsg_type == NLMSG_DONE) {
				printf("entries %lu bytes %lu\n", entries, bytes);
				return 0;
			}
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *e = NLMSG_DATA(h);
				fprintf(stderr, "netlink error %d\n", e->error);
				return 1;
			}
			entries++;
		}
	}
}
