// Reduction through subgroup operations (Features::SUBGROUP), one row part per workgroup.
// Appended to forward_common.wgsl.
//
// The subgroup size is whatever the device runs (8 on lavapipe, 32 on NVIDIA, 64 on AMD) and no
// assumption is made about which invocations share a subgroup: each subgroup stores its state
// at the index of its smallest invocation, every invocation marks whether its own index holds a
// state, and invocation 0 merges the marked states in index order — the same order every run,
// so results are bit-for-bit repeatable.

var<workgroup> sg_state: array<State, MAX_WG>;
var<workgroup> sg_holds: array<u32, MAX_WG>;

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.x + wid.y * params.groups_x;
    let st = scan_unit(g, 0u, lid, WG_SIZE);

    let m = subgroupMax(st.m);
    let s = subgroupAdd(st.s * exp(st.m - m));
    let best = subgroupMax(st.best);
    let idx = subgroupMin(select(NO_INDEX, st.idx, st.best == best));
    let bad = subgroupOr(st.bad);
    let first = subgroupMin(lid);
    sg_holds[lid] = u32(first == lid);
    if first == lid {
        sg_state[lid] = State(m, s, best, idx, bad);
    }
    workgroupBarrier();
    if lid == 0u {
        // Invocation 0 is the smallest of its subgroup, so slot 0 always holds a state.
        var acc = sg_state[0];
        for (var k = 1u; k < WG_SIZE; k++) {
            if sg_holds[k] != 0u {
                acc = merge(acc, sg_state[k]);
            }
        }
        emit(g, 0u, acc);
    }
}
