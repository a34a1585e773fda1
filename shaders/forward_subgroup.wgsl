// The forward kernel's state combined over one subgroup (Features::SUBGROUP only): appended to
// forward.wgsl and followed by reduce_subgroup.wgsl.

fn subgroup_reduce(st: State, lid: u32) -> State {
    let m = subgroupMax(st.ms.m);
    let s = subgroupAdd(st.ms.s * exp(st.ms.m - m));
    let best = subgroupMax(st.top.best);
    let idx = subgroupMin(select(NO_INDEX, st.top.idx, st.top.best == best));
    let bad = subgroupOr(st.bad);
    return State(MaxSum(m, s), Top(best, idx), bad);
}
