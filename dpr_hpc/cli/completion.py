"""Shell completion of dpr-hpc's command and flag names, read from its argparse parser, so a
new command or flag completes without touching this file and no extra package is needed.

    eval "$(dpr-hpc completion bash)"
"""

from __future__ import annotations

import argparse
import shlex

FUNCTION = "_dpr_hpc_complete"


def command_options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each command's option strings ('--runs-root', '-h', ...), in the parser's order."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001 (argparse has no public way)
    return {name: [option for action in sub._actions for option in action.option_strings]  # noqa: SLF001
            for name, sub in commands.choices.items()}


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function: command names first, then the command's flags after a dash,
    else file names (grids, run folders)."""
    options = command_options(parser)
    top = [option for action in parser._actions for option in action.option_strings]  # noqa: SLF001
    cases = "\n".join(f"        {shlex.quote(name)}) opts={shlex.quote(' '.join(flags))} ;;" for name, flags in options.items())
    prog = parser.prog
    return f"""# {prog} completion for bash: eval "$({prog} completion bash)"
{FUNCTION}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" command="" word opts=""
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$word" in -*) ;; *) command="$word"; break ;; esac
    done
    if [[ -z "$command" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W {shlex.quote(' '.join(top))} -- "$cur"))
        else
            COMPREPLY=($(compgen -W {shlex.quote(' '.join(options))} -- "$cur"))
        fi
        return
    fi
    case "$command" in
{cases}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F {FUNCTION} {prog}"""
