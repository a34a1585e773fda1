// Reduction through workgroup memory only: works on every adapter.
// Appended to a kernel (online_softmax.wgsl + its own file); uses its `State`, `merge`,
// `scan_unit`, `emit`, `after_unit` and the WG_SIZE / ROWS_PER_WG overrides.

var<workgroup> wg_state: array<State, MAX_WG>;

@compute @workgroup_size(WG_SIZE)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lanes = WG_SIZE / ROWS_PER_WG;
    let slot = lid / lanes;
    let lane = lid % lanes;
    let g = wid.x + wid.y * params.groups_x;

    wg_state[lid] = scan_unit(g, slot, lane, lanes);
    workgroupBarrier();

    // Tree reduction within each group of `lanes` (need not be a power of two when
    // ROWS_PER_WG is 1). Every invocation reaches every barrier.
    var width = lanes;
    while width > 1u {
        let half = (width + 1u) / 2u;
        if lane < width - half {
            wg_state[lid] = merge(wg_state[lid], wg_state[lid + half]);
        }
        workgroupBarrier();
        width = half;
    }
    if lane == 0u {
        emit(g, slot, wg_state[lid]);
    }
    after_unit(g, slot, lane, lanes);
}
