/* nodeagent's eBPF data path, compiled by bcc when the agent starts.
 *
 *   connect4/6    (cgroup, node subtree)  enrolled pods' outbound TCP -> the proxy
 *   getpeername4  (cgroup, node subtree)  apps still see where they connected
 *   sockops       (cgroup, node subtree)  original destination by client port; counters
 *   sk_lookup     (each pod's netns)      inbound TCP to the pod's IP -> the proxy
 *   sk_msg        (loopback_socks)        proxy-requested splices (and loopback legs) skip the proxy
 *   sk_skb        (skb_socks)             bytes from a remote peer go past the proxy (requested)
 *
 * Knobs arrive as -D flags; PIN_DIR is where the maps are pinned.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <linux/socket.h>
#include "nodeagent.h"

#define VERDICT_ALLOW 1
#define VERDICT_DENY 0          /* connect() fails with EPERM */
#define LOOPBACK_NET 0x7f000000 /* 127.0.0.0/8, host order */
#define TCP_STATE_SYN_SENT 2
#define TCP_STATE_CLOSE 7
#define LOOPBACK_IP 0x7f000001  /* 127.0.0.1, host order */

/* BPF_SOCKHASH with a pin (bcc pins a map whose section names a path), so a
 * restarted agent's programs share the sockets of its predecessor's. */
#define NA_SOCKHASH_PINNED(_name, _key_type, _max_entries, _pinned) \
struct _name##_table_t { _key_type key; int leaf; \
  int (*update) (_key_type *, int *); int (*delete) (_key_type *); \
  int (*sock_hash_update) (void *, void *, u64); int (*msg_redirect_hash) (void *, void *, u64); \
  int (*sk_redirect_hash) (void *, void *, u64); u32 max_entries; }; \
__attribute__((section("maps/sockhash:" _pinned))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* Written by the loader, read by the next agent before it adopts these pins. */
BPF_TABLE_PINNED("array", __u32, struct na_pins, layout, 1, PIN_DIR "/layout");
BPF_TABLE_PINNED("hash", __u64, struct na_pod, pods_by_netns, NA_MAX_PODS, PIN_DIR "/pods_by_netns");
BPF_TABLE_PINNED("hash", __u32, struct na_pod, pods_by_ip, NA_MAX_PODS, PIN_DIR "/pods_by_ip");
BPF_TABLE_PINNED("lru_hash", __u64, struct na_orig_dst, orig_by_cookie, 65536, PIN_DIR "/orig_by_cookie");
BPF_TABLE_PINNED("lru_hash", struct na_orig_key, struct na_orig_dst, orig_by_port, 65536, PIN_DIR "/orig_by_port");
BPF_TABLE_PINNED("percpu_array", __u32, struct na_counters, counters, NA_MAX_PODS, PIN_DIR "/counters");
BPF_TABLE_PINNED("hash", struct na_policy_key, __u32, policy, 4096, PIN_DIR "/policy");
BPF_TABLE_PINNED("hash", __u32, __u32, ip_identity, 65536, PIN_DIR "/ip_identity");
BPF_TABLE_PINNED("hash", __u32, __u32, outbound_skip_ports, 256, PIN_DIR "/outbound_skip_ports");
BPF_TABLE_PINNED("hash", __u32, __u32, inbound_skip_ports, 256, PIN_DIR "/inbound_skip_ports");
BPF_TABLE_PINNED("array", __u32, struct na_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("sockmap", __u32, int, inbound_listeners, NA_MAX_PODS, PIN_DIR "/inbound_listeners");
NA_SOCKHASH_PINNED(loopback_socks, struct na_sock_key, 65536, PIN_DIR "/loopback_socks");
BPF_TABLE_PINNED("lru_hash", struct na_sock_key, struct na_msg_state, msg_state, 65536, PIN_DIR "/msg_state");
BPF_TABLE_PINNED("lru_hash", struct na_sock_key, struct na_splice, splices, 16384, PIN_DIR "/splices");
NA_SOCKHASH_PINNED(skb_socks, __u64, 32768, PIN_DIR "/skb_socks");
BPF_TABLE_PINNED("lru_hash", __u64, struct na_skb_splice, skb_splices, 16384, PIN_DIR "/skb_splices");
/* The proxy's own sockets in pods, by socket cookie, registered before they connect: a mark
 * would not do, as any process in a pod with NET_ADMIN can set one. Written only by the agent
 * and its workers (root, through the pin); an entry is needed until the connection is
 * established, when na_sockops drops it; the LRU bound covers connects that never got there. */
BPF_TABLE_PINNED("lru_hash", __u64, __u32, proxy_socks, 65536, PIN_DIR "/proxy_socks");
/* Pods over a limit of theirs in the proxy (their handshake rate), by netns cookie: until this CLOCK_MONOTONIC time (ns) their captured connects fail with EPERM instead of
 * reaching the proxy to be accepted and refused there (proxy/refusal.py). Written by the agent;
 * an entry past its time refuses nothing; removed when the pod leaves. */
BPF_TABLE_PINNED("hash", __u64, __u64, refusing, NA_MAX_PODS, PIN_DIR "/refusing");
/* Inbound connections refused at a local address of an enrolled pod that the mesh does not
 * serve (IPv6, or an IPv4 address other than the pod's), by that address. */
BPF_TABLE_PINNED("lru_hash", struct na_addr, __u64, unmeshed_refused, 4096, PIN_DIR "/unmeshed_refused");

/* bcc declares bpf_get_socket_cookie as returning u32; the cookie is 64 bits. */
static __u64 (*na_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

static __always_inline struct na_counters *pod_counters(struct na_pod *pod)
{
    __u32 slot = pod->slot;
    return counters.lookup(&slot);
}

static __always_inline struct na_pod *enrolled_pod(void *ctx)
{
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct na_pod *pod = pods_by_netns.lookup(&netns);
    if (!pod || !(pod->flags & NA_POD_ENROLLED))
        return 0;
    return pod;
}

static __always_inline int denied_by(struct na_policy_key *key)
{
    return policy.lookup(key) != 0;
}

/* Any deny rule matching (source class, destination class, port), where a
 * rule's 0 is a wildcard. Connect time only, never per packet. */
static __always_inline int policy_denies(__u32 src, __u32 dst, __u32 port)
{
    struct na_policy_key key = {};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        key.src_identity = (i & 1) ? 0 : src;
        key.dst_identity = (i & 2) ? 0 : dst;
        key.dst_port = (i & 4) ? 0 : port;
        if ((i & 1 || src) && (i & 2 || dst) && (i & 4 || port) && denied_by(&key))
            return 1;
    }
    return 0;
}

/* One of the proxy's own sockets (sock_addr and sock_ops contexts). */
static __always_inline int is_proxy_socket(void *ctx)
{
    __u64 cookie = na_socket_cookie(ctx);
    return proxy_socks.lookup(&cookie) != 0;
}

/* The decision for an IPv4 destination (network order ip/port): redirect to
 * the proxy, leave alone, or deny. Shared by connect4 and v4-mapped connect6. */
static __always_inline int capture_v4(struct bpf_sock_addr *ctx, struct na_pod *pod, __u32 ip, __u16 port_n,
                                      int *redirect)
{
    __u32 port = bpf_ntohs(port_n);
    *redirect = 0;
    if ((bpf_ntohl(ip) & 0xff000000) == LOOPBACK_NET || ip == pod->pod_ip)
        return VERDICT_ALLOW;
    if (outbound_skip_ports.lookup(&port))
        return VERDICT_ALLOW;
    struct na_counters *c = pod_counters(pod);
    __u32 *dst_identity = ip_identity.lookup(&ip);
    if (policy_denies(pod->identity, dst_identity ? *dst_identity : 0, port)) {
        if (c)
            c->denied++;
        return VERDICT_DENY;
    }
    __u64 netns = bpf_get_netns_cookie(ctx);
    __u64 *until = refusing.lookup(&netns);
    if (until && bpf_ktime_get_ns() < *until) {
        if (c)
            c->over_limit++;
        return VERDICT_DENY;
    }
    struct na_orig_dst orig = {.ip = ip, .port = port_n, .family = AF_INET};
    __u64 cookie = na_socket_cookie(ctx);
    orig_by_cookie.update(&cookie, &orig);
    if (c)
        c->redirected++;
    *redirect = 1;
    return VERDICT_ALLOW;
}

int na_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return VERDICT_ALLOW;
    struct na_pod *pod = enrolled_pod(ctx);
    if (!pod || is_proxy_socket(ctx))
        return VERDICT_ALLOW;
    int redirect;
    int verdict = capture_v4(ctx, pod, ctx->user_ip4, ctx->user_port, &redirect);
    if (redirect) {
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(pod->outbound_port);
    }
    return verdict;
}

/* IPv6 is not meshed yet: v4-mapped destinations are captured like IPv4,
 * loopback passes, and any other IPv6 destination of an enrolled pod is
 * refused rather than sent around the mesh. */
int na_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return VERDICT_ALLOW;
    struct na_pod *pod = enrolled_pod(ctx);
    if (!pod || is_proxy_socket(ctx))
        return VERDICT_ALLOW;
    __u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
    if (!w0 && !w1 && !w2 && w3 == bpf_htonl(1))
        return VERDICT_ALLOW;
    if (!w0 && !w1 && w2 == bpf_htonl(0xffff)) {
        int redirect;
        int verdict = capture_v4(ctx, pod, w3, ctx->user_port, &redirect);
        if (redirect) {
            ctx->user_ip6[3] = bpf_htonl(0x7f000001);
            ctx->user_port = bpf_htons(pod->outbound_port);
        }
        return verdict;
    }
    struct na_counters *c = pod_counters(pod);
    if (c)
        c->denied++;
    return VERDICT_DENY;
}

/* After a redirect, getpeername() would show the proxy; show the original. */
int na_getpeername4(struct bpf_sock_addr *ctx)
{
    __u64 cookie = na_socket_cookie(ctx);
    struct na_orig_dst *orig = orig_by_cookie.lookup(&cookie);
    if (orig) {
        ctx->user_ip4 = orig->ip;
        ctx->user_port = orig->port;
    }
    return 1;
}

/* A redirected connection is filed under (netns cookie, client port) for the
 * proxy. This runs before the final ACK leaves, so before the proxy can
 * accept, and whether or not the pod is still enrolled: the redirect happened. */
static __always_inline void file_original_destination(struct bpf_sock_ops *skops)
{
    __u64 cookie = na_socket_cookie(skops);
    struct na_orig_dst *orig = orig_by_cookie.lookup(&cookie);
    if (!orig)
        return;
    struct na_orig_key key = {.netns_cookie = bpf_get_netns_cookie(skops), .client_port = skops->local_port};
    orig_by_port.update(&key, orig);
}

static __always_inline int fast_path_on(__u32 bit)
{
    __u32 zero = 0;
    struct na_config *cfg = config.lookup(&zero);
    return cfg && (cfg->fast_paths & bit);
}

static __always_inline struct na_sock_key sock_key_of(struct bpf_sock_ops *skops)
{
    struct na_sock_key key = {.netns_cookie = bpf_get_netns_cookie(skops), .remote_ip4 = skops->remote_ip4,
                              .local_port = skops->local_port, .remote_port = bpf_ntohl(skops->remote_port)};
    return key;
}

/* A loopback connection in an enrolled pod's namespace (an app and the
 * proxy's listener or its connection to the app, or two processes of the
 * pod) joins the sockhash as soon as it is established, before either side
 * can send, so that its sendmsg() can skip TCP. Both ends have one address:
 * 127.0.0.1, or the pod's IP (the proxy reaches apps there), routed over lo.
 * Runs for the pods' sockets and, attached to the proxy's cgroup, for the
 * proxy's ends. */
static __always_inline void join_loopback(struct bpf_sock_ops *skops, struct na_pod *pod, int proxy)
{
    if (skops->family != AF_INET || skops->local_ip4 != skops->remote_ip4 ||
        !fast_path_on(NA_FAST_SPLICE | NA_FAST_LOOPBACK))
        return;
    struct na_sock_key key = sock_key_of(skops);
    struct na_msg_state state = {.mode = NA_MSG_UNDECIDED, .slot = pod->slot,
                                 .flags = proxy ? NA_SOCK_PROXY : 0};
    /* (bcc rewrites these map calls into statements: assign, then test) */
    long err = loopback_socks.sock_hash_update(skops, &key, BPF_ANY);
    if (err == 0) {
        msg_state.update(&key, &state);
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

/* The proxy's ends of loopback connections, when the proxy's cgroup is not
 * below the pods' (the lab; an agent run outside Kubernetes). */
int na_sockops_proxy(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
        skops->op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    struct na_pod *pod = enrolled_pod(skops);
    if (!pod)
        return 1;
    if (skops->op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] == TCP_STATE_CLOSE) {
            struct na_sock_key key = sock_key_of(skops);
            msg_state.delete(&key);
        }
        return 1;
    }
    join_loopback(skops, pod, 1);
    return 1;
}

/* The proxy's end of a connection accepted on its outbound or inbound listener (both on
 * 127.0.0.1 in the pod). A root process of the pod can join the listener's SO_REUSEPORT group
 * and accept there too: its sockets then pass for the proxy's here (its own pod's only). */
static __always_inline int accepted_by_proxy(struct bpf_sock_ops *skops, struct na_pod *pod)
{
    __u32 zero = 0;
    struct na_config *cfg = config.lookup(&zero);
    return skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && skops->local_ip4 == bpf_htonl(LOOPBACK_IP) &&
           (skops->local_port == pod->outbound_port || (cfg && skops->local_port == cfg->inbound_port));
}

int na_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET && skops->family != AF_INET6)
        return 1;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        file_original_destination(skops);
    struct na_pod *pod = enrolled_pod(skops);
    if (!pod)
        return 1;
    /* The proxy's sockets are only met here when the agent runs below the pods' cgroup (its
     * own pod in a cluster); in the lab na_sockops_proxy sees them instead. */
    int proxy = 0;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB)
        proxy = is_proxy_socket(skops);
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        join_loopback(skops, pod, proxy || accepted_by_proxy(skops, pod));
    if (proxy && skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        __u64 cookie = na_socket_cookie(skops);
        proxy_socks.delete(&cookie);  /* no hook asks about it again */
    }
    if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == TCP_STATE_CLOSE) {
        struct na_sock_key key = sock_key_of(skops);
        msg_state.delete(&key);  /* the kernel drops it from the sockhash itself */
    }
    if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB || proxy)
        return 1;  /* counters below are about the pod's own connects */
    struct na_counters *c = pod_counters(pod);
    if (!c)
        return 1;
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        break;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        c->opened++;
        break;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[0] == TCP_STATE_SYN_SENT && skops->args[1] == TCP_STATE_CLOSE)
            c->failed++;
        break;
    }
    return 1;
}

static __always_inline void count_fast_bytes(struct na_msg_state *st, __u64 bytes)
{
    __u32 slot = st->slot;
    struct na_counters *c = counters.lookup(&slot);
    if (c)
        c->fast_path_bytes += bytes;
}

/* sendmsg() of a socket in loopback_socks. */
int na_msg(struct sk_msg_md *msg)
{
    if (msg->family != AF_INET)
        return SK_PASS;
    struct na_sock_key self = {.netns_cookie = bpf_get_netns_cookie(msg), .remote_ip4 = msg->remote_ip4,
                               .local_port = msg->local_port, .remote_port = bpf_ntohl(msg->remote_port)};
    struct na_msg_state *st = msg_state.lookup(&self);
    if (!st)
        return SK_PASS;
    __u64 size = msg->size;
    struct na_splice *sp = splices.lookup(&self);
    if (sp && (st->mode == NA_MSG_SPLICED || sp->forwarded == st->sent)) {
        long verdict = loopback_socks.msg_redirect_hash(msg, &sp->target, 0);
        if (verdict == SK_PASS) {
            st->mode = NA_MSG_SPLICED;
            __sync_fetch_and_add(&sp->offered, size);
            return SK_PASS;
        }
        /* the target is gone: the proxy still reads its end and will see to the rest */
    }
    st->sent += size;
    if (st->mode == NA_MSG_TCP || (st->mode == NA_MSG_UNDECIDED &&
                                   ((st->flags & NA_SOCK_PROXY) || !fast_path_on(NA_FAST_LOOPBACK)))) {
        st->mode = NA_MSG_TCP;
        return SK_PASS;
    }
    struct na_sock_key peer = {.netns_cookie = self.netns_cookie, .remote_ip4 = self.remote_ip4,
                               .local_port = self.remote_port, .remote_port = self.local_port};
    long verdict = loopback_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (st->mode == NA_MSG_UNDECIDED)  /* peer not in the sockhash yet: TCP, for good */
        st->mode = verdict == SK_PASS ? NA_MSG_PEER : NA_MSG_TCP;
    if (verdict == SK_PASS)
        count_fast_bytes(st, size);
    return SK_PASS;  /* a PEER socket whose peer is gone: TCP (the peer has closed) */
}

/* A received skb on a socket in skb_socks (the proxy put it there). Nothing asked: the
 * proxy reads it as usual. Redirect failed (the target is gone): the proxy reads it too and
 * will find the target closed. */
int na_skb_verdict(struct __sk_buff *skb)
{
    __u64 cookie = na_socket_cookie(skb);
    struct na_skb_splice *sp = skb_splices.lookup(&cookie);
    if (!sp)
        return SK_PASS;
    __u32 len = skb->len;
    long verdict = loopback_socks.sk_redirect_hash(skb, &sp->target, 0);
    if (verdict != SK_PASS)
        return SK_PASS;
    __sync_fetch_and_add(&sp->redirected, len);
    return SK_PASS;
}

#define LOOPBACK_IFINDEX 1  /* lo is the first device of every network namespace */

/* sk_lookup cannot tell which namespace it runs in, so a refusal at an address the mesh does
 * not serve is counted by that address; the agent sums them per pod from the addresses each
 * pod's namespace holds. */
static __always_inline void count_unmeshed_refusal(struct na_addr *local)
{
    __u64 one = 1;
    __u64 *count = unmeshed_refused.lookup(local);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        unmeshed_refused.update(local, &one);
}

/* Inbound: every TCP connection to an enrolled pod's IP lands on the proxy's
 * inbound listener in that pod, whatever the port, except the mesh port and
 * exempt ports. No listener (no agent): refused, never around the proxy.
 *
 * Attached to enrolled pods' namespaces only (the agent detaches it when a pod
 * leaves), so anything else that reaches such a namespace from outside is
 * refused: IPv6 (the mesh is IPv4), another address the pod gave itself, and
 * the proxy's own listener ports (steering those would loop the proxy onto
 * itself). The pod talking to itself is never steered: over lo (127.0.0.1,
 * ::1), or from an IPv4 address of its own to the same (the proxy reaches an
 * app at the pod's IP that way, so an app listening on 127.0.0.1 only stays
 * out of reach, as without a mesh; the kernel reports such a connection's
 * ingress as the device holding the address, not lo). Nothing from outside can
 * pass for that: lo only carries what the namespace's own stack sends, and an
 * IPv4 packet arriving with one of the namespace's own addresses as its source
 * is a martian the kernel drops before any lookup (tests/test_kernel_holes.py
 * shows it). IPv6 has no such check, so its only exemption is lo. */
int na_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex == LOOPBACK_IFINDEX ||
        (ctx->family == AF_INET && ctx->remote_ip4 == ctx->local_ip4))
        return SK_PASS;
    __u32 port = ctx->local_port, zero = 0;
    struct na_config *cfg = config.lookup(&zero);
    if ((cfg && port == cfg->mesh_port) || inbound_skip_ports.lookup(&port))
        return SK_PASS;
    struct na_addr key = {};
    if (ctx->family != AF_INET) {
        key.words[0] = ctx->local_ip6[0];
        key.words[1] = ctx->local_ip6[1];
        key.words[2] = ctx->local_ip6[2];
        key.words[3] = ctx->local_ip6[3];
        count_unmeshed_refusal(&key);
        return SK_DROP;
    }
    __u32 local_ip = ctx->local_ip4;
    struct na_pod *pod = pods_by_ip.lookup(&local_ip);
    if (!pod || !(pod->flags & NA_POD_ENROLLED)) {
        key.words[2] = bpf_htonl(0xffff);  /* IPv4-mapped */
        key.words[3] = local_ip;
        count_unmeshed_refusal(&key);
        return SK_DROP;
    }
    struct na_counters *c = pod_counters(pod);
    if (port == pod->outbound_port || (cfg && port == cfg->inbound_port)) {
        if (c)
            c->proxy_port_refused++;
        return SK_DROP;
    }
    __u32 slot = pod->slot;
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listeners.lookup(&slot);
    if (!sk) {
        if (c)
            c->inbound_refused++;
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        if (c)
            c->inbound_refused++;
        return SK_DROP;
    }
    if (c)
        c->inbound_steered++;
    return SK_PASS;
}
