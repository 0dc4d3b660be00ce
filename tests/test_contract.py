"""The request contract (geomgen.contract, geomgen.optionspec): the rules where
they live, then each rule refused at submission through real processes with no
GPU work done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from geomgen import GeometryClient, GeometryRequest, contract, protocol
from geomgen.backends.hunyuan3d import Hunyuan3DBackend
from geomgen.backends.mesh import MeshBackend
from geomgen.backends.sam3d import Sam3dBackend
from geomgen.backends.silhouette import SilhouetteBackend
from geomgen.errors import InputError
from geomgen.optionspec import OptionSpec, parse_options, specs_from_wire, specs_to_wire
from tests.conftest import REPO, wait_for
from tests.plugins import box_glb

SAMPLES = REPO / "src" / "geomgen" / "samples"

# --- output names -------------------------------------------------------------------


@pytest.mark.parametrize("text, stem", [
    ("my chair", "my_chair"),
    ("chaise_été", "chaise_ete"),
    ("-x", "x"),
    ("..x", "x"),
    ("a..b", "a.b"),
    ("Ölfass (2)", "Olfass_2_"),
    ("ok-name_1.v2", "ok-name_1.v2"),
    ("x" * 300, "x" * 128),
])
def test_sanitize_stem_makes_any_name_valid(text, stem):
    assert contract.sanitize_stem(text) == stem
    assert contract.name_problem(stem) is None


def test_sanitize_stem_of_a_name_with_nothing_ascii_keeps_inputs_apart():
    first, second = contract.sanitize_stem("椅子"), contract.sanitize_stem("桌子")
    assert first.startswith("model_") and second.startswith("model_") and first != second
    assert contract.name_problem(first) is None


@pytest.mark.parametrize("name", ["", "my chair", "-x", "..x", "a/b", "a\\b", "chaise_été", ".hidden", "x" * 129, 5])
def test_an_explicit_output_name_must_meet_the_rule(name):
    with pytest.raises(InputError) as info:
        contract.check_output_name(name)
    assert info.value.code == "bad_name" and "output_filename" in info.value.message


def test_output_stem_sanitises_a_derived_name_and_checks_a_given_one():
    assert contract.output_stem(None, "my chair.png") == "my_chair"
    assert contract.output_stem(None, "chaise_été.png") == "chaise_ete"
    assert contract.output_stem("table.glb", "x.png") == "table"
    with pytest.raises(InputError, match="for example 'my_table'"):
        contract.output_stem("my table", "x.png")


# --- declared options ------------------------------------------------------------------

SPECS = (
    OptionSpec("steps", "integer", 5, 1, 200),
    OptionSpec("guidance", "number", 5.0, 0.0, 100.0),
    OptionSpec("flashvdm", "switch", True),
    OptionSpec("dtype", "choice", "auto", choices=("auto", "float16"), aliases={"fp16": "float16"}),
    OptionSpec("device", "text", "auto", pattern=r"auto|cpu|cuda(:[0-9]+)?"),
)


def test_options_are_parsed_from_strings_and_typed_values_alike():
    given = {"steps": "7", "guidance": 2, "flashvdm": "off", "dtype": "FP16", "device": "cuda:1"}
    assert parse_options("x", SPECS, given) == {"steps": 7, "guidance": 2.0, "flashvdm": False,
                                                "dtype": "float16", "device": "cuda:1"}
    assert parse_options("x", SPECS, {"steps": 7.0, "flashvdm": True}) == {"steps": 7, "flashvdm": True}


@pytest.mark.parametrize("given, words", [
    ({"stpes": 5}, "unknown x option(s) stpes; known: steps, guidance"),
    ({"steps": 0}, "steps must be an integer from 1 to 200"),
    ({"steps": 2.5}, "an integer"),
    ({"steps": True}, "an integer"),
    ({"guidance": "nan"}, "a number from 0 to 100"),
    ({"flashvdm": "maybe"}, "true or false"),
    ({"dtype": "int8"}, "one of auto, float16"),
    ({"device": "tpu"}, "matching"),
])
def test_bad_options_are_refused_with_a_sentence_naming_them(given, words):
    with pytest.raises(InputError) as info:
        parse_options("x", SPECS, given)
    assert info.value.code == "bad_option" and words in info.value.message


def test_declarations_travel_on_the_wire_unchanged():
    for specs in (SPECS, MeshBackend.options_spec, Hunyuan3DBackend.options_spec, Sam3dBackend.options_spec):
        assert specs_from_wire(json.loads(json.dumps(specs_to_wire(specs)))) == tuple(specs)
    assert specs_from_wire(None) is None
    for bad in ([{"kind": "number"}], [{"name": "a", "kind": "colour"}], [{"name": "a", "kind": "text",
                                                                          "pattern": "("}], "x"):
        with pytest.raises((ValueError, TypeError)):
            specs_from_wire(bad)


def test_every_builtin_backend_declares_its_options():
    for cls in (MeshBackend, SilhouetteBackend, Hunyuan3DBackend, Sam3dBackend):
        assert cls.options_spec, cls.name
        defaults = contract.check_backend_options(cls.name, cls.options_spec, {})
        assert defaults == {}


def test_backend_options_are_scoped_then_checked():
    options = {"silhouette.height_m": "0.3", "mesh.unit": "mm", "hunyuan3d.steps": 9}
    assert contract.check_backend_options("mesh", MeshBackend.options_spec, options) == {"unit": "mm"}
    assert contract.check_backend_options("silhouette", SilhouetteBackend.options_spec, options) == {"height_m": 0.3}
    with pytest.raises(InputError, match="BACKEND.KEY"):
        contract.check_backend_options("mesh", MeshBackend.options_spec, {"height_m": 1})
    assert contract.check_backend_options("plugin", None, {"anything": 1}) == {"anything": 1}


def test_sam3d_config_travels_as_the_sam3d_backends_options():
    merged = contract.with_sam3d_config({"mesh.unit": "mm"}, {"mode": "text", "text_prompt": "chair", "seed": None})
    assert merged == {"mesh.unit": "mm", "sam3d.mode": "text", "sam3d.text_prompt": "chair"}
    assert contract.check_backend_options("sam3d", Sam3dBackend.options_spec, merged) == {
        "mode": "text", "text_prompt": "chair"}
    with pytest.raises(InputError, match="given twice"):
        contract.with_sam3d_config({"sam3d.mode": "foreground"}, {"mode": "text"})
    with pytest.raises(InputError) as info:
        contract.check_backend_options("sam3d", Sam3dBackend.options_spec,
                                       contract.with_sam3d_config({}, {"mode": "telepathy"}))
    assert info.value.code == "bad_option"


# --- conversion options and physical hints -----------------------------------------------


def test_collision_parameters_are_checked_per_method():
    assert contract.collision_params("coacd", {"threshold": "0.1", "merge": "off"}) == {"threshold": 0.1,
                                                                                      "merge": False}
    assert contract.collision_params("vhacd", {}, resolve=True)["max_convex_hulls"] == 32
    for method, params, words in [("coacd", {"thresold": 0.1}, "unknown coacd collision option(s) thresold"),
                                  ("coacd", {"threshold": 0}, "threshold must be a number from"),
                                  ("hull", {"threshold": 0.1}, "known: none"),
                                  ("vhacd", {"max_convex_hulls": 0}, "max_convex_hulls"),
                                  ("convex", {}, "collision must be one of")]:
        with pytest.raises(InputError) as info:
            contract.collision_params(method, params)
        assert info.value.code == "bad_option" and words in info.value.message


def test_mass_and_material_together_give_the_mass_and_the_materials_friction():
    options = contract.convert_options({"mass_kg": 2, "material": "wood"})
    assert options.mass_kg == 2.0 and options.friction() == 0.5 and options.density() == 600.0
    assert contract.convert_options({"material": "rubber", "mu": 0.2}).friction() == 0.2
    assert contract.convert_options({}).friction() == contract.DEFAULT_MU and contract.convert_options({}).density() is None


@pytest.mark.parametrize("data, words", [
    ({"mass_kg": 2, "density_kg_m3": 500}, "mass_kg or density_kg_m3"),
    ({"dimensions": [1, 1, 1], "scale": 2}, "not dimensions and scale"),
    ({"height_m": 0.3, "scale": 2}, "not scale and height_m"),
    ({"material": "unobtainium"}, "unknown material"),
    ({"mass_kg": -1}, "mass_kg must be a finite number > 0"),
    ({"dimensions": [1, 1]}, "three numbers"),
    ({"mu": -0.1}, "mu must be"),
    ({"collision": "hull", "collision_params": {"threshold": 0.1}}, "hull collision"),
    ({"simplify_faces": 2}, "simplify_faces"),
    ({"colour": "red"}, "unknown conversion option(s) colour"),
])
def test_contradicting_or_bad_conversion_options_are_refused(data, words):
    with pytest.raises(InputError) as info:
        contract.convert_options(data)
    assert info.value.code == "bad_option" and words in info.value.message


def test_convert_options_normalise_once_and_round_trip():
    options = contract.convert_options({"mass_kg": 2, "dimensions": (1, 2, 3), "collision_params": {"seed": "7"}})
    assert options.mass_kg == 2.0 and isinstance(options.mass_kg, float)
    assert options.dimensions == [1.0, 2.0, 3.0] and options.collision_params == {"seed": 7}
    assert contract.convert_options(options.to_dict()) == options
    assert contract.convert_options(options) == options


def test_mass_plus_material_through_the_converter(tmp_path):
    from geomgen.geometry.convert import convert_mesh

    options = contract.convert_options({"mass_kg": 2.0, "material": "rubber", "collision": "hull"})
    report = convert_mesh(box_glb(), "box.glb", tmp_path, "box", options)
    assert report.mass_kg == pytest.approx(2.0) and report.mu == pytest.approx(0.9)
    sdf = (tmp_path / "box" / "box.sdf").read_text()
    assert "<mass>2.0</mass>" in sdf
    assert "<drake:mu_dynamic>0.9</drake:mu_dynamic>" in sdf


# --- refused at submission, through real processes -----------------------------------------

PLUGINS = "declared=tests.plugins:DeclaredBackend"


def _log(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")


def _raw_request(sock: zmq.Socket, request_id: str, **fields) -> protocol.Result:
    """Send one REQUEST straight to the broker (bypassing the client's own checks)
    and return its FINAL."""
    base = dict(request_id=request_id, backend="silhouette", input_name="chair.png",
                input_data=(SAMPLES / "chair.png").read_bytes(), output_name="chair", events=False)
    sock.send_multipart(protocol.encode(protocol.ClientRequest(**{**base, **fields})))
    while True:
        assert sock.poll(20_000), f"no answer for {request_id}"
        command, message = protocol.decode(sock.recv_multipart(), protocol.BROKER_TO_CLIENT)
        if command is protocol.Command.FINAL and message.request_id == request_id:
            return message


def test_bad_requests_are_refused_at_submission_and_no_worker_sees_them(procs, endpoints, zctx, tmp_path):
    """A misspelt backend option (declared by a built-in backend, and by a plug-in
    known only to its worker), a misspelt collision parameter and a bad output
    name: each refused by the broker itself, and the workers never see a job."""
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port), "--no-worker-timeout", "30")
    silhouette = procs.start("gpu-worker", "--backend", "silhouette", "--broker", broker_arg)
    # The plug-in is registered on the worker's side only: the broker learns its options from READY.
    declared = procs.start("gpu-worker", "--backend", "declared", "--broker", broker_arg,
                           env={"GEOMGEN_BACKENDS": PLUGINS, "PYTHONPATH": str(REPO)})
    with GeometryClient(endpoints.client, timeout_s=30) as client:
        wait_for(lambda: all(client.health()["backends"].get(b, {}).get("alive") for b in ("silhouette", "declared")),
                 timeout_s=60, what="both workers")
    sock = zctx.socket(zmq.DEALER)
    sock.connect(endpoints.client)
    cases = {
        "opt": dict(backend_options={"heigth_m": 0.3}),
        "range": dict(backend_options={"silhouette.resolution": 5}),
        "plugin": dict(backend="declared", input_name="box.glb", input_data=box_glb(),
                       backend_options={"delay": 1}),
        "plugin-range": dict(backend="declared", input_name="box.glb", input_data=box_glb(),
                             backend_options={"delay_s": 1e6}),
        "param": dict(convert={"collision_params": {"thresold": 0.1}}),
        "name": dict(output_name="my chair"),
        "sam3d": dict(backend="sam3d", backend_options={"sam3d.mode": "telepathy"}),
    }
    results = {key: _raw_request(sock, key, **fields) for key, fields in cases.items()}
    for key, result in results.items():
        assert not result.ok and result.attempts == 0, key
        assert result.error["stage"] == "input", (key, result.error)
    assert {k: r.error["code"] for k, r in results.items()} == {
        "opt": "bad_option", "range": "bad_option", "plugin": "bad_option", "plugin-range": "bad_option",
        "param": "bad_option", "name": "bad_name", "sam3d": "bad_option"}
    assert "heigth_m" in results["opt"].error["message"] and "delay" in results["plugin"].error["message"]
    assert "thresold" in results["param"].error["message"]
    # A good request afterwards is served: the broker went on, and the workers are idle and fresh.
    good = _raw_request(sock, "good", want_sdf=False)
    assert good.ok, good.error
    with GeometryClient(endpoints.client, timeout_s=30) as client:
        workers = {w["backend"]: w for w in client.health()["workers"]}
    assert workers["silhouette"]["completed"] == 1 and workers["silhouette"]["failed"] == 0
    assert workers["declared"]["completed"] == 0 and workers["declared"]["failed"] == 0
    sock.close(0)
    assert "started" not in _log(declared) and _log(silhouette).count("started") == 1


def test_names_from_any_file_name_end_to_end(procs, endpoints, tmp_path):
    """`my chair.png` and `chaise_été.png` give valid packages named after them,
    through the client, the broker, the silhouette worker and the SDF worker."""
    broker_arg = f"127.0.0.1:{endpoints.client_port}"
    procs.start("broker", "--host", "127.0.0.1", "--port", str(endpoints.client_port))
    procs.start("gpu-worker", "--backend", "silhouette", "--broker", broker_arg)
    procs.start("sdf-worker", "--broker", broker_arg)
    inputs = tmp_path / "in"
    inputs.mkdir()
    chair = (SAMPLES / "chair.png").read_bytes()
    for name in ("my chair.png", "chaise_été.png"):
        (inputs / name).write_bytes(chair)
    out = tmp_path / "out"
    requests = [GeometryRequest(image_path=inputs / name, output_dir=out, backend="silhouette", collision="hull",
                                mass_kg=2.0, material="wood")
                for name in ("my chair.png", "chaise_été.png")]
    with GeometryClient(endpoints.client, timeout_s=60) as client:
        wait_for(lambda: client.health()["backends"].get("silhouette", {}).get("alive") and
                 client.health()["sdf_slots"], timeout_s=60, what="workers")
        results = dict(client.generate(requests))
    for index, stem in ((0, "my_chair"), (1, "chaise_ete")):
        result = results[index]
        assert result.ok, (result.stage, result.error_code, result.error)
        assert result.glb_path == out / f"{stem}.glb" and result.sdf_path == out / stem / f"{stem}.sdf"
        assert result.info["mass_kg"] == pytest.approx(2.0) and result.info["mu"] == pytest.approx(0.5)
