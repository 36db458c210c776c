"""Tab completion in bash for ``rankvisor`` and ``python -m supervisor``.

::

    eval "$(rankvisor --shell-completion install=bash)"       # or python -m supervisor --shell-completion ...
        └─ _rankvisor_complete, registered for rankvisor, python and python3
             <TAB> ─ COMP_LINE up to the cursor ─▶ `rankvisor --shell-completion query=bash`
                                                   (`PYTHON -m supervisor ...` for a python line)
                                                   ─▶ query(): the words after the program ─▶ choices
             a python line that is not `-m supervisor` goes to python's completion from before the install

Hydra's own script registers one command: the installed app's name, or ``python`` for ``python app.py`` lines
only (it looks for ``@hydra.main`` in the file after ``python``), so ``python -m supervisor`` never completed, and
its query took ``-m supervisor`` for overrides. The choices themselves are still Hydra's (config groups, their
options and keys, as composed so far); the flags, ``status`` and its options are ours.
"""
from __future__ import annotations

import os
import re
from typing import Any

STATUS_OPTIONS = ("--json", "--watch", "--restart", "--stop", "--list", "--help")
# The program at the start of a line: `python -m supervisor` (any python: python3, /usr/bin/python3.11), else the
# first word (rankvisor, or a path to it).
_PROGRAM = re.compile(r"^\s*(?:\S*python[\d.]*\s+-m\s+supervisor(?=\s|$)|\S+)\s*")

BASH = r"""
_rankvisor_old_python=$(complete -p python 2>/dev/null | sed -n 's/.*-F \([^ ]*\).*/\1/p')
_rankvisor_old_python3=$(complete -p python3 2>/dev/null | sed -n 's/.*-F \([^ ]*\).*/\1/p')
_rankvisor_complete()
{
    local line=${COMP_LINE:0:$COMP_POINT}
    local -a _rv_words=($line)
    local -a program=("${_rv_words[0]}")
    if [[ "${_rv_words[0]##*/}" == python* ]]; then
        if [[ "${_rv_words[1]}" != -m || "${_rv_words[2]}" != supervisor ]]; then
            local old
            eval "old=\$_rankvisor_old_${1##*/}"  # another python command: python's completion from before
            [[ -n "$old" ]] && "$old" "$@"
            return
        fi
        program=("${_rv_words[0]}" -m supervisor)
    fi
    local word=""
    [[ "$line" == *[[:space:]] ]] || word=${_rv_words[${#_rv_words[@]}-1]}
    local choices
    choices=$(COMP_LINE="$line" "${program[@]}" --shell-completion query=bash 2>/dev/null)
    COMPREPLY=($(compgen -W "$choices" -- "$word"))
    # bash splits the word at "=" and ":" (COMP_WORDBREAKS): each reply replaces only the part after the split
    local cur=${COMP_WORDS[COMP_CWORD]}
    local head=${word%"$cur"}
    [[ -n "$head" && "$head" != "$word" ]] && COMPREPLY=("${COMPREPLY[@]#"$head"}")
}
complete -o nospace -o default -F _rankvisor_complete rankvisor python python3
"""

UNINSTALL = r"""
complete -r rankvisor python python3 2>/dev/null
[[ -n "$_rankvisor_old_python" ]] && complete -o default -F "$_rankvisor_old_python" python
[[ -n "$_rankvisor_old_python3" ]] && complete -o default -F "$_rankvisor_old_python3" python3
unset -f _rankvisor_complete
unset _rankvisor_old_python _rankvisor_old_python3
"""


def shell_completion(hydra: Any, config_name: str, overrides: list[str]) -> None:
    """``--shell-completion install=bash | uninstall=bash | query=bash``; other shells are Hydra's (its zsh script
    queries with query=bash, so zsh gets these choices for ``rankvisor`` lines)."""
    ours = {"install=bash": lambda: BASH, "uninstall=bash": lambda: UNINSTALL,
            "query=bash": lambda: " ".join(query(hydra, config_name, os.environ.get("COMP_LINE", "")))}
    if len(overrides) == 1 and overrides[0] in ours:
        print(ours[overrides[0]]().strip())
    else:
        hydra.shell_completion(config_name=config_name, overrides=overrides)


def query(hydra: Any, config_name: str, line: str) -> list[str]:
    """The choices for the last word of ``line`` (the command line up to the cursor, program included)."""
    args = _PROGRAM.sub("", line, count=1)
    words = args.split()
    word = "" if not args or args[-1].isspace() else words.pop()
    if words[:1] == ["status"]:
        return [o for o in STATUS_OPTIONS if o.startswith(word)] if word.startswith("-") or not word else []
    if word.startswith("-"):
        return sorted(o for o in _flags() if o.startswith(word))
    first = ["status"] if not words and "status".startswith(word) else []
    return first + _hydra_choices(hydra, config_name, args)


def _flags() -> list[str]:
    from supervisor.cli import _parser

    return [o for action in _parser()._actions for o in action.option_strings]


def _hydra_choices(hydra: Any, config_name: str, args: str) -> list[str]:
    """Hydra's completion of config groups, options and keys; nothing where it cannot parse the line."""
    from hydra._internal.hydra import Hydra

    plugin = Hydra.get_shell_to_plugin_map(hydra.config_loader)["bash"][0]
    try:
        return plugin._query(config_name=config_name, line=args)
    except (Exception, SystemExit):  # a half-typed flag or override: no choices, never a traceback in the prompt
        return []
