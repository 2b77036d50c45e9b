/* Every struct that crosses the kernel boundary, mirrored once in Python
 * (nodeagent/datapath/abi.py; tests/test_abi.py checks the sizes). */
#ifndef NODEAGENT_H
#define NODEAGENT_H

#include <linux/types.h>

#define NA_MAX_PODS 1024

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

struct na_config {
    __u32 proxy_mark;      /* SO_MARK of the proxy's own sockets: never redirected */
    __u32 mesh_port;       /* proxy-to-proxy listener in each pod: never steered inbound */
};

/* Per pod, per CPU; the agent sums the CPUs. */
struct na_counters {
    __u64 redirected;      /* outbound connects sent to the proxy */
    __u64 opened;          /* outbound TCP connections established by the pod */
    __u64 failed;          /* outbound connects that never established */
    __u64 denied;          /* connects refused by policy (EPERM) */
    __u64 inbound_steered; /* inbound connections steered onto the proxy */
    __u64 inbound_refused; /* inbound connections refused: no proxy listening */
};

#endif
