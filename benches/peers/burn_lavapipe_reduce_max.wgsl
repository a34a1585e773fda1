// burn 0.22.1 / cubek-reduce: the kernel burn's autotuner picks for max_dim(1) over [64, 128256] f32
// on lavapipe (unit_vectorized_parallel_reduce; cube_dim 8 x 2 x 1; in/out vector size 4; config Max).
// Captured with CUBECL_DEBUG_LOG while running examples/burn_reduce_repro.rs. On lavapipe
// (Mesa 22.3.6) it leaves rows 2 and 3 of every 4 wrong; the same strategy is right on SwiftShader.
// Kept as the reduced case for a report to Mesa or burn (see BENCHMARKS.md).
@group(0) @binding(1) var<storage, read_write> v7: array<vec4<f32>>;
@group(0) @binding(0) var<storage, read_write> v1: array<vec4<f32>>;
struct info_st { scalars_usize: array<u32, 6>, static_meta: array<u32, 6>, dynamic_meta: array<u32> }
@group(0) @binding(2) var<storage, read> info_var: info_st;
@compute @workgroup_size(8, 2, 1)
fn reduce_kernel_in_f32_in_size_4_out_f32_out_size_4_acc_f32_d96e4131(@builtin(workgroup_id) v286: vec3<u32>, @builtin(num_workgroups) v288: vec3<u32>, @builtin(local_invocation_index) v295: u32) {
let v302 = &v7;
let v303 = &v1;
var<function> inv_return_flag_v147_store: bool= true;
let inv_return_flag_v147 = &inv_return_flag_v147_store;
let v2 = info_var.scalars_usize[0];
let v3 = info_var.scalars_usize[1];
let v5 = u32(0);
let v8 = info_var.scalars_usize[2];
let v9 = info_var.scalars_usize[3];
let v149 = info_var.static_meta[1];
let v13 = info_var.scalars_usize[4];
var<function> v150_store: u32;
let v150 = &v150_store;
*v150 = v2;
var<function> v151_store: u32;
let v151 = &v151_store;
*v151 = v3;
var<function> v152_store: u32;
let v152 = &v152_store;
*v152 = v8;
var<function> v153_store: u32;
let v153 = &v153_store;
*v153 = v9;
let v287 = v286[2];
let v263 = u32(v287);
let v289 = v288[1];
let v265 = u32(v289);
let v266 = v263 * v265;
let v290 = v288[0];
let v268 = u32(v290);
let v269 = v266 * v268;
let v291 = v286[1];
let v271 = u32(v291);
let v274 = v271 * v268;
let v275 = v269 + v274;
let v293 = v286[0];
let v277 = u32(v293);
let v278 = v275 + v277;
let v297 = u32(16);
let v281 = v278 * v297;
let v296 = v295;
let v283 = u32(v296);
let v284 = v281 + v283;
let v154 = info_var.static_meta[3];
let v23 = u32(4);
let v25 = f32(0.0);
let v26 = vec4<f32>(v25);
var<function> v157_store: vec4<f32>;
let v157 = &v157_store;
*v157 = v26;
let v158 = info_var.static_meta[2];
let v159 = v158 + v13;
let v160 = info_var.dynamic_meta[v159];
var<function> v161_store: vec4<f32>;
let v161 = &v161_store;
let v31 = *v157;
*v161 = v31;
var<function> v162_store: u32;
let v162 = &v162_store;
*v162 = v160;
var<function> v163_store: u32;
let v163 = &v163_store;
*v163 = v284;
let v35 = v284 * v23;
let v37 = *v152;
let v39 = v37 * v23;
let v41 = v35 >= v39;
if v41 {
let v42 = false;
*inv_return_flag_v147 = v42;

}
let v43 = *inv_return_flag_v147;
if v43 {
let v46 = u32(1);
for(var v47: u32 = v5; v47 < v23; v47 += v46) {
let v49 = v35 + v47;
var<function> v165_store: u32;
let v165 = &v165_store;
*v165 = v5;
let v56 = *v151;
for(var v58: u32 = v5; v58 < v56; v58 += v46) {
let v167 = info_var.static_meta[5];
let v168 = v167 + v58;
let v169 = info_var.dynamic_meta[v168];
let v62 = v49 / v169;
let v171 = v154 + v58;
let v172 = info_var.dynamic_meta[v171];
let v65 = v62 % v172;
let v173 = info_var.static_meta[4];
let v174 = v173 + v58;
let v175 = info_var.dynamic_meta[v174];
let v68 = v65 * v175;
let v69 = *v165;
let v70 = v69 + v68;
*v165 = v70;

}
let v71 = *v165;
let v73 = v71 / v23;
*v165 = v73;
let v77 = v160 / v23;
var<function> v179_store: vec4<f32>;
let v179 = &v179_store;
*v179 = v26;
let v81 = u32(4286578688);
let v82 = bitcast<f32>(v81);
let v83 = vec4<f32>(v82);
var<function> v180_store: vec4<f32>;
let v180 = &v180_store;
*v180 = v83;
for(var v87: u32 = v5; v87 < v77; v87 += v46) {
let v89 = *v165;
let v90 = v87 + v89;
let v94 = &(*v303)[v90];
let v95 = *v94;
let v98 = *v180;
let v182 = max(v98, v95);
let v208 = bitcast<vec4<u32>>(v95);
let v209 = u32(2139095040);
let v210 = vec4<u32>(v209);
let v211 = u32(2147483647);
let v212 = vec4<u32>(v211);
let v213 = v208 & v212;
let v214 = v213 > v210;
let v184 = select(v182, v95, v214);
let v215 = bitcast<vec4<u32>>(v98);
let v220 = v215 & v212;
let v221 = v220 > v210;
let v186 = select(v184, v98, v221);
*v180 = v186;

}
var<function> v187_store: f32;
let v187 = &v187_store;
*v187 = v82;
let v103 = *v180;
let v104 = v103[0];
let v105 = *v187;
let v188 = max(v104, v105);
let v222 = bitcast<u32>(v105);
let v223 = u32(2139095040);
let v224 = u32(2147483647);
let v225 = v222 & v224;
let v226 = v225 > v223;
let v190 = select(v188, v105, v226);
let v227 = bitcast<u32>(v104);
let v230 = v227 & v224;
let v231 = v230 > v223;
let v192 = select(v190, v104, v231);
*v187 = v192;
let v107 = *v180;
let v108 = v107[1];
let v109 = *v187;
let v193 = max(v108, v109);
let v232 = bitcast<u32>(v109);
let v235 = v232 & v224;
let v236 = v235 > v223;
let v195 = select(v193, v109, v236);
let v237 = bitcast<u32>(v108);
let v240 = v237 & v224;
let v241 = v240 > v223;
let v197 = select(v195, v108, v241);
*v187 = v197;
let v111 = *v180;
let v112 = v111[2];
let v113 = *v187;
let v198 = max(v112, v113);
let v242 = bitcast<u32>(v113);
let v245 = v242 & v224;
let v246 = v245 > v223;
let v200 = select(v198, v113, v246);
let v247 = bitcast<u32>(v112);
let v250 = v247 & v224;
let v251 = v250 > v223;
let v202 = select(v200, v112, v251);
*v187 = v202;
let v115 = *v180;
let v116 = v115[3];
let v117 = *v187;
let v203 = max(v116, v117);
let v252 = bitcast<u32>(v117);
let v255 = v252 & v224;
let v256 = v255 > v223;
let v205 = select(v203, v117, v256);
let v257 = bitcast<u32>(v116);
let v260 = v257 & v224;
let v261 = v260 > v223;
let v207 = select(v205, v116, v261);
*v187 = v207;
let v119 = *v187;
let v120 = *v161;

    var v121_tmp: vec4<f32> = v120;
    v121_tmp[v47] = v119;
    let v121 = v121_tmp;
*v161 = v121;

}
let v122 = *v163;
let v123 = u32(v122);
let v124 = u32(v123);
let v138 = *v152;
let v139 = v124 < v138;
if v139 {
let v141 = v124 < v149;
if v141 {
let v145 = &(*v302)[v124];
let v146 = *v161;
*v145 = v146;

}

}

}
return;

}

