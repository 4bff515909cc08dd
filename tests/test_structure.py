"""Structure: localswarm.py's size budget, watched by CI (tinygrad's sz.py is the model). Every
banner section is a chapter a newcomer can hold in their head (at most 900 lines), each function
fits a screen (60 lines, unless its docstring says why it is long), every banner names the tests
that cover its section, and the sections depend only on the ones above them, so the file reads
top to bottom. `python tests/test_structure.py` prints the table of sections and sizes."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "localswarm.py")
MAX_SECTION_LINES = 900
MAX_FUNCTION_LINES = 60
BAR = "#" * 78
# The dependencies that point down the file, by design: the decided order reads engine ->
# swarm -> consensus, and the Swarm calls the consensus section's pure functions (vote,
# settled, majority_prefix) as it gathers the voters' answers, and the executed vote just
# below it (which runs the answers' code on the prompt's checks, then uses the consensus).
DOWNWARD_ALLOWED = {("Swarm", "Consensus"), ("Swarm", "Executed vote")}


class Section:
    def __init__(self, title: str, first: int, last: int, banner: str):
        self.title, self.first, self.last, self.banner = title, first, last, banner

    @property
    def lines(self) -> int:
        return self.last - self.first + 1

    @property
    def name(self) -> str:
        """The banner's opening words, up to the first colon: "Engine scheduler", "Prompt cache"."""
        return self.title.split(":", 1)[0]


def sections(text: str) -> list:
    """The banner sections of a module: a line of 78 #, comment lines, a line of 78 #."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines[:-1]) if line == BAR and lines[i + 1].startswith("# ")]
    out = []
    for k, i in enumerate(starts):
        j = i + 1
        while lines[j] != BAR:
            j += 1
        banner = " ".join(line[2:] for line in lines[i + 1:j])
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)      # 1-based: the line before the next bar
        out.append(Section(lines[i + 1][2:], i + 1, end, banner))
    return out


def section_of(secs: list, lineno: int) -> Section:
    """The section a (1-based) line is in; the module's docstring and imports count as the first."""
    return ([s for s in secs if s.first <= lineno] or secs[:1])[-1]


def long_functions(tree: ast.AST) -> list:
    """(name, line, length) of functions over MAX_FUNCTION_LINES whose docstring does not say why."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if n > MAX_FUNCTION_LINES and not re.search(r"\blong\b", doc):
                out.append((node.name, node.lineno, n))
    return out


def top_level_names(tree: ast.Module) -> dict:
    """Each module-level name and the line that first binds it."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound = [node.name]
        elif isinstance(node, ast.Assign):
            bound = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound = [node.target.id]
        else:
            bound = []
        for name in bound:
            names.setdefault(name, node.lineno)
    return names


def local_names(node: ast.AST) -> set:
    """Names a module-level statement binds inside itself (arguments, assignments, nested defs)."""
    out = set()
    for m in ast.walk(node):
        if isinstance(m, ast.Name) and isinstance(m.ctx, ast.Store):
            out.add(m.id)
        elif isinstance(m, ast.arguments):
            out |= {a.arg for a in m.posonlyargs + m.args + m.kwonlyargs}
        elif isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and m is not node:
            out.add(m.name)
    return out


def downward_uses(tree: ast.Module, secs: list) -> dict:
    """{(section, lower section): names} where code uses a name that a section below it defines."""
    defined = {name: section_of(secs, line).name for name, line in top_level_names(tree).items()}
    order = [s.name for s in secs]
    out = {}
    for node in tree.body:
        here = section_of(secs, node.lineno).name
        skip = set() if isinstance(node, (ast.Assign, ast.AnnAssign)) else local_names(node)
        for m in ast.walk(node):
            if isinstance(m, ast.Name) and m.id in defined and m.id not in skip:
                there = defined[m.id]
                if order.index(there) > order.index(here):
                    out.setdefault((here, there), set()).add(m.id)
    return out


def table(secs: list) -> str:
    rows = [f"{s.lines:6d}  {s.name}" for s in secs]
    return "\n".join([" lines  section"] + rows + [f"{sum(s.lines for s in secs):6d}  localswarm.py"])


def load():
    text = open(SOURCE, encoding="utf-8").read()
    return text, sections(text), ast.parse(text)


def test_every_section_fits_the_budget():
    _, secs, _ = load()
    print("\n" + table(secs))
    over = [f"{s.name}: {s.lines} lines" for s in secs if s.lines > MAX_SECTION_LINES]
    assert len(secs) >= 20 and not over, f"sections over {MAX_SECTION_LINES} lines: {over}\n{table(secs)}"


def test_every_function_fits_a_screen_or_says_why():
    _, _, tree = load()
    assert long_functions(tree) == [], f"functions over {MAX_FUNCTION_LINES} lines without a docstring " \
                                       f"saying why they are long: {long_functions(tree)}"


def test_section_names_are_unique_and_every_banner_names_its_tests():
    _, secs, _ = load()
    names = [s.name for s in secs]
    assert len(set(names)) == len(names), names
    for s in secs:
        files = re.findall(r"tests/(test_\w+\.py)", s.banner.split("Tests:", 1)[-1]) if "Tests:" in s.banner else []
        assert files, f"the banner of {s.name!r} does not name its tests (Tests: tests/test_....py)"
        for f in files:
            assert os.path.exists(os.path.join(ROOT, "tests", f)), f"{s.name}: tests/{f} does not exist"


def test_sections_use_only_the_ones_above_them():
    _, secs, tree = load()
    down = {k: sorted(v) for k, v in downward_uses(tree, secs).items() if k not in DOWNWARD_ALLOWED}
    assert down == {}, f"sections that reach down the file (move the code, or pass it in): {down}"


def test_sections_are_in_data_flow_order():
    """The decided order: config -> hardware -> planner -> download -> engine -> swarm ->
    consensus -> API -> federation -> MCP -> CLI (tool calls and chat templates, pure text,
    come before the engine that decodes their prompts)."""
    _, secs, _ = load()
    order = ["Helpers and errors", "Config", "Hardware", "Registry and planner", "Download", "Tool calls",
             "Chat templates", "Engine contract", "llama.cpp adapter", "Prompt cache", "Engine scheduler",
             "Swarm", "Consensus", "API dialects, OpenAI", "Service", "HTTP server", "Federation", "MCP",
             "CLI and main"]
    names = [s.name for s in secs]
    positions = [names.index(n) for n in order]
    assert positions == sorted(positions), names


def test_the_checks_catch_what_they_are_for():
    """The budget's own checks, on a small module: a long section, a long function, a use of a
    name from further down."""
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    text = (f"{BAR}\n# First: uses later. Tests: tests/test_structure.py.\n{BAR}\n\ndef early():\n    return late()\n\n"
            f"def big():\n{body}\n\n{BAR}\n# Second: defines late. Tests: tests/test_structure.py.\n{BAR}\n\n"
            "def late():\n    return 1\n")
    tree = ast.parse(text)
    secs = sections(text)
    assert [s.name for s in secs] == ["First", "Second"] and secs[0].last == secs[1].first - 1
    assert [f[0] for f in long_functions(tree)] == ["big"]
    assert downward_uses(tree, secs) == {("First", "Second"): {"late"}}


def test_the_readme_lists_the_sections_and_walks_through_real_functions():
    """The README's "How it works" names every section, in order, and each function of its
    walk-through of one request exists."""
    text, secs, _ = load()
    import localswarm as ls
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    how = readme[readme.index("## How it works"):]
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", how, re.M)
    assert listed == [s.name for s in secs], (listed, [s.name for s in secs])
    walk = how[how.index("One request"):]
    steps = re.findall(r"`([A-Za-z_][\w.]*)`", walk.split("\n\n", 1)[0])
    assert len(steps) >= 10, steps
    for step in steps:
        obj = ls
        for part in step.split("."):
            assert hasattr(obj, part), f"the README's walk-through names {step}, which does not exist"
            obj = getattr(obj, part)


if __name__ == "__main__":
    print(table(load()[1]))
    sys.exit(0)
