#!/usr/bin/env python3
"""Build localswarm.pyz: localswarm.py + models.json + __main__.py as a zipapp (a zip
after a #! line, which Python runs as it would a zipapp.create_archive one).

The archive is reproducible (sorted entries, fixed timestamps), so two builds of the same
sources are byte-identical. Usage: python build_pyz.py [-o localswarm.pyz]
"""
import argparse
import os
import pathlib
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["localswarm.py", "models.json"]
FIXED_DATE = (1980, 1, 6, 0, 0, 0)   # zip timestamps cannot go earlier than 1980

MAIN = '''import sys
if sys.version_info < (3, 9):
    sys.exit("localswarm needs Python 3.9 or newer (this is %d.%d)" % sys.version_info[:2])
import localswarm
localswarm.run()
'''


def build(target: str) -> str:
    """Write the archive to target and return its path."""
    entries = {name: pathlib.Path(HERE, name).read_bytes() for name in FILES}
    entries["__main__.py"] = MAIN.encode()
    tmp = target + ".tmp"
    with open(tmp, "wb") as out:
        out.write(b"#!/usr/bin/env python3\n")        # what zipapp writes for an interpreter
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
                info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
                z.writestr(info, entries[name])
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)       # never leave a half-written archive
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "localswarm.pyz"),
                    help="where to write the archive (default: %(default)s)")
    out = build(ap.parse_args().output)
    print(f"built {out} ({os.path.getsize(out):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
