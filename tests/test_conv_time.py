"""tools/conv_time.py: oneDNN's verbose log summed by primitive and direction, only inside the
marked step, from the log format of oneDNN 3.x (with and without the timestamp field)."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("conv_time", REPO / "tools" / "conv_time.py")
conv_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv_time)

FWD = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv:avx2,forward_training,"
       "src:f32::blocked:acdb::f0 wei:f32:a:blocked:Acdb8a::f0 bia:undef::undef::"
       " dst:f32::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,"
       "mb128_ic16oc16_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,{ms}")
BWD = ("onednn_verbose,1764763200000.5,primitive,exec,cpu,convolution,jit:avx2,backward_weights,"
       "src:f32::blocked:acdb::f0,,alg:convolution_direct,mb128_ic16oc16_ih32oh32kh3,{ms}")
CREATE = ("onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brgconv:avx2,"
          "forward_training,src:f32,,alg:convolution_direct,mb128,0.25")


def test_sums_only_the_marked_step_by_primitive_and_direction():
  log = "\n".join([
      FWD.format(ms=100.0),  # a warm-up step: not counted
      conv_time.MARK,
      CREATE,  # primitive creation: not a run
      FWD.format(ms=1.5), FWD.format(ms=2.25), BWD.format(ms=4.0),
      "some other output",
      conv_time.END + ' {"step_ms": 12.5}',
      FWD.format(ms=100.0),  # after the step: not counted
  ])
  totals, record = conv_time.summarize(log)
  assert totals == {("convolution", "forward_training"): [2, 3.75],
                    ("convolution", "backward_weights"): [1, 4.0]}
  assert record == {"step_ms": 12.5}
