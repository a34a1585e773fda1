// Writing a work unit's result, and the `combine` pass for split rows: the same for every kernel
// of the family. Appended to the kernel's own file, whose `State`, `merge`, `finish`, `partials`
// and `ROWS_PER_WG` it uses (WGSL has no generics; the names are the contract).
//
// After `emit`, the reductions' `main` calls the kernel's `after_unit(g, slot, lane, lanes)` from
// every invocation, in uniform control flow: nothing for the forward and KLD kernels; the
// training kernel's second pass over the row (its gradient) when the row was not split.

// Stores a finished unit: the row's result, or a partial state for `combine`.
fn emit(g: u32, slot: u32, st: State) {
    let unit = g * ROWS_PER_WG + slot;
    let row = unit / params.split;
    if row >= params.rows {
        return;
    }
    if params.split == 1u {
        finish(row, st);
    } else {
        partials[unit] = st;
    }
}

// Second pass for split rows: one invocation per row merges its parts in row order.
@compute @workgroup_size(64)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let row = gid.x + gid.y * groups.x * 64u;
    if row >= params.rows {
        return;
    }
    var st = partials[row * params.split];
    for (var p = 1u; p < params.split; p++) {
        st = merge(st, partials[row * params.split + p]);
    }
    finish(row, st);
}
