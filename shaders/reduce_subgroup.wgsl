// Reduction through subgroup operations (Features::SUBGROUP), one row part per workgroup.
// Appended to forward_common.wgsl.
//
// The subgroup size is whatever the device runs (8 on lavapipe, 32 on NVIDIA, 64 on AMD) and no
// assumption is made about which invocations share a subgroup: each subgroup's first active
// lane claims a slot with an atomic, and invocation 0 merges the claimed slots.

var<workgroup> sg_state: array<State, MAX_WG>;
var<workgroup> sg_count: atomic<u32>;

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
) {
    if lid == 0u {
        atomicStore(&sg_count, 0u);
    }
    workgroupBarrier();
    let g = wid.x + wid.y * params.groups_x;
    let st = scan_unit(g, 0u, lid, WG_SIZE);

    let m = subgroupMax(st.m);
    let s = subgroupAdd(st.s * exp(st.m - m));
    let best = subgroupMax(st.best);
    let idx = subgroupMin(select(NO_INDEX, st.idx, st.best == best));
    let bad = subgroupOr(st.bad);
    // The lowest active lane of each subgroup (naga 30 has no subgroupElect).
    if subgroupBroadcastFirst(sg_lane) == sg_lane {
        let k = atomicAdd(&sg_count, 1u);
        sg_state[k] = State(m, s, best, idx, bad);
    }
    workgroupBarrier();
    if lid == 0u {
        let n = atomicLoad(&sg_count);
        var acc = sg_state[0];
        for (var k = 1u; k < n; k++) {
            acc = merge(acc, sg_state[k]);
        }
        emit(g, 0u, acc);
    }
}
