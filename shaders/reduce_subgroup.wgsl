// Reduction through subgroup operations (Features::SUBGROUP), one row part per workgroup.
// Appended to a kernel and its `subgroup_reduce(State, lid) -> State` (which combines the states of
// one subgroup with subgroup operations); uses the kernel's `State`, `merge`, `scan_unit`, `emit`,
// `after_unit`.
//
// The subgroup size is whatever the device runs (8 on lavapipe, 32 on NVIDIA, 64 on AMD) and no
// assumption is made about which invocations share a subgroup: each subgroup stores its state
// at the index of its smallest invocation, and invocation 0 merges the stored states in index
// order — the same order every run, so results are bit-for-bit repeatable. When every subgroup
// turns out to be a contiguous, aligned run of invocations (the usual layout), invocation 0
// visits only every subgroup-size-th slot; otherwise it visits every slot. Both visit the same
// states in the same order.

var<workgroup> sg_state: array<State, MAX_WG>;
var<workgroup> sg_holds: array<u32, MAX_WG>;
var<workgroup> sg_contiguous: atomic<u32>;

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    if lid == 0u {
        atomicStore(&sg_contiguous, 1u);
    }
    workgroupBarrier();
    let g = wid.x + wid.y * params.groups_x;
    let st = subgroup_reduce(scan_unit(g, 0u, lid, WG_SIZE), lid);
    let first = subgroupMin(lid);
    let last = subgroupMax(lid);
    let count = subgroupAdd(1u);
    sg_holds[lid] = u32(first == lid);
    if first == lid {
        sg_state[lid] = st;
        if first % sg_size != 0u || count != sg_size || last != first + sg_size - 1u {
            atomicStore(&sg_contiguous, 0u);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        // Invocation 0 is the smallest of its subgroup, so slot 0 always holds a state.
        let step = select(1u, sg_size, atomicLoad(&sg_contiguous) == 1u);
        var acc = sg_state[0];
        for (var k = step; k < WG_SIZE; k += step) {
            if sg_holds[k] != 0u {
                acc = merge(acc, sg_state[k]);
            }
        }
        emit(g, 0u, acc);
    }
    after_unit(g, 0u, lid, WG_SIZE);
}
