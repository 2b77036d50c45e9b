/* Every struct that crosses the kernel boundary, mirrored once in Python
 * (nodeagent/datapath/abi.py; tests/test_abi.py checks the sizes). */
#ifndef NODEAGENT_H
#define NODEAGENT_H

#include <linux/types.h>

#define NA_MAX_PODS 1024

/* The layout of the pinned maps: their names, key and value structs and sizes. Bump it with
 * any change to them (tests/test_abi.py notices one): an agent refuses to adopt pins of another
 * layout rather than misread them (datapath/loader.py, check_layout). */
#define NA_LAYOUT_VERSION 3

/* What the loader leaves for the next agent: the value of the `layout` map (one entry). */
struct na_pins {
    __u32 layout_version;  /* NA_LAYOUT_VERSION of the pinned maps */
    __u32 pad;
    __u64 programs_digest; /* of the pinned programs' source, flags and kernel: same, no compile */
};

/* na_pod.flags */
#define NA_POD_ENROLLED 1

/* One enrolled pod: the value of pods_by_netns (key: netns cookie) and of
 * pods_by_ip (key: pod IPv4, network order). */
struct na_pod {
    __u32 pod_ip;          /* network order */
    __u32 slot;            /* index into counters and inbound_listeners */
    __u32 identity;        /* policy class of the pod's workload; 0: none */
    __u16 outbound_port;   /* the proxy's outbound listener, 127.0.0.1:<port> in the pod */
    __u16 flags;
};

/* Where a redirected connection was going. */
struct na_orig_dst {
    __u32 ip;              /* network order */
    __u16 port;            /* network order */
    __u16 family;          /* AF_INET */
};

/* The proxy finds the original destination of an accepted connection by the
 * pod it accepted in and the client's port (the client is 127.0.0.1). */
struct na_orig_key {
    __u64 netns_cookie;
    __u32 client_port;     /* host order */
    __u32 pad;
};

/* A deny rule; 0 in a field matches anything. */
struct na_policy_key {
    __u32 src_identity;
    __u32 dst_identity;
    __u32 dst_port;        /* host order */
};

/* na_config.fast_paths */
#define NA_FAST_SPLICE 1       /* sk_msg: opaque connections the proxy asks for skip it */
#define NA_FAST_LOOPBACK 2     /* sk_msg: loopback legs skip TCP (no backpressure: see README) */
#define NA_FAST_SKB 4          /* sk_skb: bytes from a remote peer go past the proxy (no backpressure) */

struct na_config {
    __u32 mesh_port;       /* proxy-to-proxy listener in each pod: never steered inbound */
    __u32 inbound_port;    /* the proxy's inbound listener, 127.0.0.1:<port> in each pod */
    __u32 fast_paths;      /* NA_FAST_* bits */
    __u32 pad;
};

/* A TCP socket in a pod's namespace, as its own side sees it (ports in host
 * order). Its loopback peer has the ports swapped and the same namespace. */
struct na_sock_key {
    __u64 netns_cookie;
    __u32 remote_ip4;      /* network order */
    __u16 local_port;
    __u16 remote_port;
};

/* na_msg_state.mode: where a socket's sendmsg() goes when no splice is due.
 * Decided at its first send and then kept: a receiver must never get newer
 * bytes in its psock queue than in its TCP queue, as it reads the psock queue
 * first. (Older bytes in the psock queue and newer ones by TCP are fine.) */
#define NA_MSG_UNDECIDED 0
#define NA_MSG_TCP 1           /* loopback TCP, as without us */
#define NA_MSG_PEER 2          /* straight into the loopback peer's receive queue */
#define NA_MSG_SPLICED 3       /* to the splice target (see na_splice) */

/* na_msg_state.flags */
#define NA_SOCK_PROXY 1        /* one of the proxy's sockets: its sends always take TCP, so TCP's
                                * counters on it tell the proxy how much a splice carried */

/* Per loopback socket of an enrolled pod, and the proxy's ends of them. */
struct na_msg_state {
    __u32 mode;
    __u32 slot;            /* the pod's counters */
    __u64 sent;            /* bytes sent toward the peer, by either path, before a splice */
    __u32 flags;
    __u32 pad;
};

/* A splice the proxy asked for, keyed by the sending app socket: once the
 * proxy has forwarded everything the app sent (forwarded == sent), its sends
 * go into the send queue of `target`, the proxy's socket at the far side,
 * past the proxy. Into a send queue, not a receive queue, so TCP's
 * backpressure still holds the sender back. */
struct na_splice {
    struct na_sock_key target;
    __u64 forwarded;       /* bytes the proxy read from this socket and wrote on; set by the proxy */
    __u64 offered;         /* bytes handed to the target, a remainder the kernel retries counted
                            * again: a sign of life for idle timeouts, not a byte count (the
                            * proxy counts spliced bytes from the target's TCP counters) */
};

/* An sk_skb splice, keyed by the socket cookie of the proxy's socket toward a remote
 * peer: what arrives on it goes into the send queue of `target` (the proxy's socket toward
 * the app, in loopback_socks), through the kernel's psock worker. The target is not in
 * skb_socks: a verdict on its own receive path would queue what it receives behind that
 * worker, where an EOF could overtake it. */
struct na_skb_splice {
    struct na_sock_key target;
    __u64 redirected;      /* bytes handed to the target's worker queue */
};

/* Per pod, per CPU; the agent sums the CPUs. */
struct na_counters {
    __u64 redirected;      /* outbound connects sent to the proxy */
    __u64 opened;          /* outbound TCP connections established by the pod */
    __u64 failed;          /* outbound connects that never established */
    __u64 denied;          /* connects refused by policy (EPERM) */
    __u64 inbound_steered; /* inbound connections steered onto the proxy */
    __u64 inbound_refused; /* inbound connections refused: no proxy listening */
    __u64 fast_path_bytes; /* bytes its loopback sockets sent straight into a peer's receive queue
                            * (a remainder retried after the kernel ran out of memory counts again) */
    __u64 proxy_port_refused; /* inbound connections to the proxy's own listener ports: refused */
    __u64 over_limit;      /* outbound connects refused (EPERM) while the pod was over a limit */
};

/* An IPv6 address, or an IPv4 one mapped (::ffff:a.b.c.d), in network order. */
struct na_addr {
    __u32 words[4];
};

#endif
