"""Hardware: parsers on real tool output, probes through a fake PATH, the memory rules."""
import ctypes
import os
import stat
import time

import pytest

import localswarm as ls
from conftest import fixture_text


def test_nvidia_smi_lists_every_gpu():
    gpus = ls.parse_nvidia_smi(fixture_text("nvidia_smi_2x4090.csv"))
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA GeForce RTX 4090" and gpus[0].vram_total_bytes == 24564 * ls.MiB
    assert gpus[1].vram_free_bytes == 1920 * ls.MiB and gpus[0].driver == "580.65.06"


def test_nvidia_smi_skips_na_rows_and_garbage():
    assert ls.parse_nvidia_smi("0, Tesla, [N/A], [N/A], 1\nnonsense\n") == []


def test_rocm_smi_json():
    (g,) = ls.parse_rocm_smi(fixture_text("rocm_smi_7900xt.json"))
    assert g.vendor == "amd" and g.name == "Radeon RX 7900 XT"
    assert g.vram_total_bytes == 21458059264 and g.vram_free_bytes == 21458059264 - 27856896
    assert ls.parse_rocm_smi("not json") == [] and ls.parse_rocm_smi("[1, 2]") == []


@pytest.mark.parametrize("name,expected", [
    ("sycl_ls_a770_uhd630.txt", [("Intel(R) Arc(TM) A770 Graphics", True), ("Intel(R) UHD Graphics 630", False)]),
    ("sycl_ls_new_format_a750.txt", [("Intel(R) Arc(TM) A750 Graphics", True)]),
])
def test_sycl_ls_lists_each_gpu_once(name, expected):
    gpus = ls.parse_sycl_ls(fixture_text(name))
    assert [(g.name, g.discrete) for g in gpus] == expected
    assert all("level_zero" in g.driver for g in gpus)


def test_sysctl_is_read_by_name():
    m2 = ls.parse_sysctl(fixture_text("sysctl_hw_m2_24g.txt"))
    assert m2 == {"memsize": 24 * ls.GiB, "brand": "", "arm64": True, "perf_cores": 4}
    assert ls.parse_sysctl(fixture_text("sysctl_machdep_cpu_m1.txt"))["brand"] == "Apple M1"
    # An Intel Mac has neither hw.optional.arm64 nor hw.perflevel0: nothing may shift.
    intel = ls.parse_sysctl("hw.memsize: 17179869184\n"
                            "machdep.cpu.brand_string: Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz\n")
    assert intel == {"memsize": 16 * ls.GiB, "brand": "Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz",
                     "arm64": False, "perf_cores": 0}
    assert ls.parse_sysctl("") == {"memsize": 0, "brand": "", "arm64": False, "perf_cores": 0}


def test_getprop_names_the_soc():
    props = ls.parse_getprop(fixture_text("getprop_moto_g75_sm6475.txt"))
    assert props["ro.product.model"] == "moto g75 5G" and len(props) == 47
    assert ls.describe_soc(props) == "QTI SM6475" and ls.is_qualcomm(props)
    kalama = ls.parse_getprop("[ro.soc.manufacturer]: [QTI]\n[ro.soc.model]: [SM8550]\n"
                              "garbage\n[ro.board.platform]: [kalama]\n")
    assert ls.describe_soc(kalama) == "QTI SM8550 (kalama)"
    assert ls.describe_soc({"ro.board.platform": "msm8974"}) == "msm8974"
    assert not ls.is_qualcomm({"ro.soc.manufacturer": "Google", "ro.soc.model": "Tensor G2"})
    assert ls.parse_getprop("") == {} and ls.describe_soc({}) == "" and not ls.is_qualcomm({})


def test_proc_files():
    total, avail = ls.parse_meminfo(fixture_text("meminfo_24g.txt"))
    assert total > 20 * ls.GiB and 0 < avail <= total
    cpu = ls.parse_cpuinfo(fixture_text("cpuinfo_xeon_2core.txt"))
    assert cpu["threads"] >= 1 and cpu["cores"] >= 1 and "avx2" in cpu["flags"]


def fake_tool(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("body", ["sleep 30", "echo boom >&2; exit 3", "echo '%%% garbage'"])
def test_probe_survives_hung_failing_and_garbage_tools(tmp_path, monkeypatch, body):
    for tool in ("nvidia-smi", "rocm-smi", "sycl-ls", "clinfo"):
        fake_tool(tmp_path, tool, body)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls, "PROBE_TIMEOUT", 0.5)
    t = time.monotonic()
    assert ls.probe_gpus() == []
    assert time.monotonic() - t < 5


def test_probe_reads_a_working_tool(tmp_path, monkeypatch):
    fake_tool(tmp_path, "nvidia-smi", "cat " + os.path.join(os.path.dirname(__file__), "fixtures", "nvidia_smi_2x4090.csv"))
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert len(ls.probe_gpus()) == 2


def test_mac_probe_keeps_what_sysctl_knows_when_it_fails(tmp_path, monkeypatch):
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "sysctl_machdep_cpu_m1.txt")
    fake_tool(tmp_path, "sysctl", f"cat {fixture}; echo \"sysctl: unknown oid 'hw.perflevel0.physicalcpu'\" >&2; exit 1")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    assert ls.probe_mac()["brand"] == "Apple M1"


@pytest.mark.parametrize("body,count", [
    ("cat " + os.path.join(os.path.dirname(__file__), "fixtures", "getprop_moto_g75_sm6475.txt"), 47),
    ("sleep 30", 0), ("exit 1", 0), ("echo '%%% garbage'", 0)])
def test_android_probe(tmp_path, monkeypatch, body, count):
    fake_tool(tmp_path, "getprop", body)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls, "PROBE_TIMEOUT", 0.5)
    assert len(ls.probe_android_props()) == count


def test_missing_tool_means_not_present(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ls.run_probe(["nvidia-smi"]) is None


def test_detect_hardware_here_is_fast_and_complete():
    t = time.monotonic()
    hw = ls.detect_hardware()
    assert time.monotonic() - t < 4 * ls.PROBE_TIMEOUT, "every probe has a timeout"
    assert hw.ram_total_bytes > 0 and hw.cpu_cores >= 1 and hw.os


def profile(**kw):
    base = dict(os="Linux", arch="x86_64", cpu_model="cpu", cpu_cores=8, cpu_threads=16, cpu_flags=[],
                ram_total_bytes=32 * ls.GiB, ram_available_bytes=30 * ls.GiB)
    base.update(kw)
    return ls.HardwareProfile(**base)


def test_memory_rules():
    gpu = ls.GPU("nvidia", "x", 24 * ls.GiB, 24 * ls.GiB)
    assert ls.memory_budget(profile(gpus=[gpu])).bytes == int(24 * ls.GiB * 0.9)
    busy = ls.GPU("nvidia", "x", 24 * ls.GiB, 10 * ls.GiB)
    assert ls.memory_budget(profile(gpus=[busy])).bytes == 10 * ls.GiB      # free VRAM where less
    mac = profile(is_apple_silicon=True, gpus=[ls.GPU("apple", "m", 16 * ls.GiB, 0, discrete=False)],
                  ram_total_bytes=16 * ls.GiB)
    assert ls.memory_budget(mac).bytes == 8 * ls.GiB and ls.memory_budget(mac).backend == "metal"
    assert ls.memory_budget(profile()).bytes == 16 * ls.GiB
    phone = profile(is_termux=True, ram_total_bytes=8 * ls.GiB)
    assert ls.memory_budget(phone).bytes == 2 * ls.GiB
    assert ls.memory_budget(profile(), {"ram_fraction": 0.25}).bytes == 8 * ls.GiB


def test_several_gpus_are_summed_per_device():
    b = ls.memory_budget(profile(gpus=[ls.GPU("nvidia", "a", 8 * ls.GiB, 8 * ls.GiB, 0),
                                       ls.GPU("nvidia", "b", 8 * ls.GiB, 8 * ls.GiB, 1)]))
    assert len(b.devices) == 2 and b.bytes == sum(b.devices) and "2 GPUs" in b.rule


def test_detect_on_a_mac_and_a_phone_through_their_tools(tmp_path, monkeypatch):
    """The Darwin and Termux branches of detect_hardware, end to end, fed real tool output."""
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    fake_tool(tmp_path, "sysctl", f"cat {fixtures}/sysctl_hw_m2_24g.txt {fixtures}/sysctl_machdep_cpu_m1.txt")
    fake_tool(tmp_path, "getprop", f"cat {fixtures}/getprop_moto_g75_sm6475.txt")
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls.platform, "system", lambda: "Darwin")
    mac = ls.detect_hardware()
    assert mac.is_apple_silicon and mac.ram_total_bytes == 24 * ls.GiB and mac.cpu_cores == 4
    assert [g.vendor for g in mac.gpus] == ["apple"] and ls.memory_budget(mac).backend == "metal"

    monkeypatch.setattr(ls.platform, "system", lambda: "Linux")
    monkeypatch.setenv("TERMUX_VERSION", "0.118.0")
    phone = ls.detect_hardware()
    assert phone.is_termux and phone.soc == "QTI SM6475"
    assert [g.vendor for g in phone.gpus] == ["qualcomm"] and "25%" in ls.memory_budget(phone).rule


class FakeKernel32:
    """Windows' kernel32 as far as GlobalMemoryStatusEx goes: fills the struct it is handed."""

    def __init__(self, ok=True):
        self.ok = ok

    def GlobalMemoryStatusEx(self, ref):
        st = ref._obj
        assert st.dwLength == ctypes.sizeof(ls.MEMORYSTATUSEX) == 64     # the size Windows checks
        st.ullTotalPhys, st.ullAvailPhys = 16 * ls.GiB, 9 * ls.GiB
        return self.ok


def test_windows_ram_without_psutil():
    assert ls.windows_ram(FakeKernel32()) == (16 * ls.GiB, 9 * ls.GiB)
    assert ls.windows_ram(FakeKernel32(ok=False)) == (0, 0)


def test_a_hung_probe_is_killed_without_process_groups(tmp_path, monkeypatch):
    """Windows has no os.killpg: the hung tool is still killed and the probe returns None."""
    tool = tmp_path / "hangs"
    tool.write_text("#!/bin/sh\nsleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delattr(ls.os, "killpg")
    t0 = time.monotonic()
    assert ls.run_probe(["hangs"], timeout=0.5) is None
    assert time.monotonic() - t0 < 10


def fake_card(root, name, vendor, **files):
    dev = root / name / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    for fname, value in files.items():
        (dev / fname).write_text(f"{value}\n")


def test_amd_vram_comes_from_sysfs_when_rocm_smi_is_missing(tmp_path, monkeypatch):
    """Hand-made sysfs tree (the amdgpu driver's file names and formats: one decimal number of
    bytes per file); no rocm-smi on PATH."""
    root = tmp_path / "drm"
    fake_card(root, "card1", "0x1002", mem_info_vram_total=17163091968, mem_info_vram_used=1073741824,
              product_name="AMD Radeon RX 7800 XT")
    fake_card(root, "card0", "0x1002", mem_info_vram_total=536870912, mem_info_vram_used=0)     # an APU's carve-out
    fake_card(root, "card2", "0x8086")                                                           # another vendor
    (root / "card1-DP-1").mkdir()                                                                # a connector, not a card
    monkeypatch.setattr(ls, "DRM_ROOT", str(root))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    gpus = ls.probe_gpus()
    assert [(g.name, g.discrete) for g in gpus] == [("AMD GPU (card0)", False), ("AMD Radeon RX 7800 XT", True)]
    rx = gpus[1]
    assert rx.vendor == "amd" and rx.vram_total_bytes == 17163091968 and rx.vram_free_bytes == 17163091968 - 2 ** 30
    budget = ls.memory_budget(profile(gpus=gpus))
    assert budget.backend == "rocm" and budget.devices == [min(int(rx.vram_total_bytes * 0.9), rx.vram_free_bytes)]
    # (the APU's carve-out is not planned on as a card)


# --- Intel without sycl-ls: OpenCL's clinfo ---------------------------------------------------

def test_clinfo_keeps_intel_gpus_only_and_an_integrated_gpu_has_no_vram():
    """Real clinfo of a laptop: Intel CPU runtime, NVIDIA RTX 4070, Intel Iris Xe."""
    (g,) = ls.parse_clinfo(fixture_text("clinfo_irisxe_rtx4070_i9.txt"))
    assert (g.vendor, g.name, g.discrete, g.vram_total_bytes) == ("intel", "Intel(R) Iris(R) Xe Graphics", False, 0)
    assert g.driver.startswith("OpenCL ")
    assert ls.parse_clinfo(fixture_text("clinfo_rx5500xt_clover.txt")) == []     # AMD only (and build errors)
    assert ls.parse_clinfo("") == [] and ls.parse_clinfo("%%% garbage") == []


def test_clinfo_gives_a_discrete_arcs_memory():
    arc, uhd = ls.parse_clinfo(fixture_text("clinfo_arc_a770_uhd770_handmade.txt"))
    assert (arc.name, arc.discrete, arc.vram_total_bytes) == ("Intel(R) Arc(TM) A770 Graphics", True, 16225243136)
    assert (uhd.discrete, uhd.vram_total_bytes, uhd.index) == (False, 0, 1)


@pytest.mark.parametrize("sycl", [False, True])
def test_intel_vram_from_clinfo_when_sysfs_does_not_show_it(tmp_path, monkeypatch, sycl):
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "clinfo", "cat " + os.path.join(fixtures, "clinfo_arc_a770_uhd770_handmade.txt"))
    if sycl:
        fake_tool(bin_dir, "sycl-ls", "cat " + os.path.join(fixtures, "sycl_ls_a770_uhd630.txt"))
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls, "DRM_ROOT", str(tmp_path / "no-drm"))
    gpus = ls.probe_gpus()
    assert [(g.name, g.vram_total_bytes) for g in gpus if g.discrete] == [("Intel(R) Arc(TM) A770 Graphics", 16225243136)]
    assert ("level_zero" in gpus[0].driver) == sycl
    assert ls.memory_budget(profile(gpus=gpus)).backend == "sycl"


# --- Windows without vendor tools: one PowerShell call --------------------------------------

def windows_output(*names):
    return "\n".join(fixture_text(n) for n in names)


def test_windows_probe_takes_the_true_size_from_the_driver_key():
    got = ls.parse_windows_probe(windows_output("windows_processor_handmade.txt", "win32_videocontroller_rx9070xt.txt",
                                                "windows_registry_qwmemorysize_handmade.txt"))
    assert (got["cpu"], got["cores"], got["threads"]) == ("AMD Ryzen 7 7800X3D 8-Core Processor", 8, 16)
    (g,) = got["gpus"]
    assert (g.vendor, g.name, g.vram_total_bytes, g.discrete) == ("amd", "AMD Radeon RX 9070 XT", 17163091968, True)
    assert g.driver == "32.0.31021.5001" and got["notes"] == []


def test_windows_probe_without_the_driver_key_says_adapterram_is_capped():
    """Real Win32_VideoController list output (every property, wrapped lines): an NVIDIA laptop GPU
    and an Intel iGPU."""
    got = ls.parse_windows_probe(fixture_text("win32_videocontroller_rtx3050ti_uhd.txt"))
    nv, intel = got["gpus"]
    assert (nv.vendor, nv.name, nv.vram_total_bytes, nv.discrete) == ("nvidia", "NVIDIA GeForce RTX 3050 Ti Laptop GPU", 4293918720, True)
    assert (intel.vendor, intel.discrete) == ("intel", False)
    assert len(got["notes"]) == 1 and "4 GiB" in got["notes"][0] and "3050 Ti" in got["notes"][0]
    capped = ls.parse_windows_probe(fixture_text("win32_videocontroller_rx9070xt.txt"))
    assert capped["gpus"][0].vendor == "amd" and "cap" in capped["notes"][0]
    assert ls.parse_windows_probe("") == {"cpu": "", "cores": 0, "threads": 0, "gpus": [], "notes": []}


def test_format_list_joins_wrapped_values_and_splits_objects():
    blocks = ls.parse_format_list("\nName : a\nPath : C:\\x,C\n       :\\y\n\nName : b\n")
    assert blocks == [{"Name": "a", "Path": "C:\\x,C:\\y"}, {"Name": "b"}]


@pytest.mark.parametrize("body,cards", [("cat {}", 1), ("sleep 30", 0), ("exit 1", 0)])
def test_windows_probe_runs_powershell_within_its_timeout(tmp_path, monkeypatch, body, cards):
    out = tmp_path / "out.txt"
    out.write_text(windows_output("windows_processor_handmade.txt", "win32_videocontroller_rx9070xt.txt"))
    fake_tool(tmp_path, "powershell", body.format(out))
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls, "WINDOWS_PROBE_TIMEOUT", 0.5)
    t = time.monotonic()
    assert len(ls.probe_windows()["gpus"]) == cards
    assert time.monotonic() - t < 5


def test_gpus_the_os_lists_fill_in_for_missing_vendor_tools(tmp_path, monkeypatch):
    fake_tool(tmp_path, "nvidia-smi", "cat " + os.path.join(os.path.dirname(__file__), "fixtures", "nvidia_smi_2x4090.csv"))
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(ls, "DRM_ROOT", str(tmp_path / "no-drm"))
    listed = ls.parse_windows_probe(fixture_text("win32_videocontroller_rtx3050ti_uhd.txt"))["gpus"]
    gpus = ls.probe_gpus(listed)
    assert [g.vendor for g in gpus] == ["nvidia", "nvidia", "intel"]     # nvidia-smi's two, the OS's Intel
