// The training kernel's pass-1 state combined over one subgroup (Features::SUBGROUP only):
// appended to train.wgsl and followed by reduce_subgroup.wgsl. No subgroup operation sits under
// a branch.

fn subgroup_reduce(st: State, lid: u32) -> State {
    let m = subgroupMax(st.ms.m);
    let s = subgroupAdd(st.ms.s * exp(st.ms.m - m));
    let sw = subgroupAdd(st.sw);
    let swz = subgroupAdd(st.swz + shift(st.sw, st.ms.m - m));
    let bad = subgroupOr(st.bad);
    return State(MaxSum(m, s), sw, swz, bad);
}
