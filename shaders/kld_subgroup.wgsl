// The KLD kernel's state combined over one subgroup (Features::SUBGROUP only): appended to
// kld.wgsl and followed by reduce_subgroup.wgsl.
//
// The merge of kld.wgsl, done by every invocation at once: the subgroup's centre is that of the
// lowest invocation (`lid`) holding the largest base max among states with sa != 0; each
// invocation moves its own state there and to the common max (`moved`), and the sums are added.
// No subgroup operation sits under a branch.

fn subgroup_reduce(st: State, lid: u32) -> State {
    let live = st.sa != 0.0;
    let m = subgroupMax(st.ma);
    let holder = subgroupMin(select(NO_INDEX, lid, st.ma == m && live));
    // With no holder every sum is 0 and the centre does not matter.
    let c = select(subgroupMax(select(neg_inf(), st.c, lid == holder)), 0.0, holder == NO_INDEX);
    let own = moved(st, c, m);
    var r: State;
    r.ma = m;
    r.c = c;
    r.sa = subgroupAdd(select(0.0, own.sa, live));
    r.g = subgroupAdd(select(0.0, own.g, live));
    r.y = subgroupAdd(select(0.0, own.y, live));
    r.t = subgroupAdd(select(0.0, own.t, live));
    let mb = subgroupMax(st.b.m);
    let fb = exp(st.b.m - mb);
    r.b = MaxSum(mb, subgroupAdd(st.b.s * fb));
    r.zb = subgroupAdd(st.zb * fb);
    let best_a = subgroupMax(st.top_a.best);
    r.top_a = Top(best_a, subgroupMin(select(NO_INDEX, st.top_a.idx, st.top_a.best == best_a)));
    let best_b = subgroupMax(st.top_b.best);
    r.top_b = Top(best_b, subgroupMin(select(NO_INDEX, st.top_b.idx, st.top_b.best == best_b)));
    r.bad = subgroupOr(st.bad);
    return r;
}
