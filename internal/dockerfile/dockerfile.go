// Package dockerfile reads a Dockerfile's instructions for the project's
// checks of what its image promises (image/) and for the real-cluster
// harness, which builds the image the Dockerfile describes without a
// container engine (internal/kubecluster). It knows comments, parser
// directives and backslash continuations, which is all tsrelay's
// Dockerfile uses; it is not a full parser (no heredocs, no escape
// directive).
package dockerfile

import (
	"fmt"
	"strings"
)

// Instruction is one Dockerfile instruction, continuation lines joined.
type Instruction struct {
	Line int    // where it starts, 1-based
	Cmd  string // upper case: FROM, RUN, ...
	Args string
}

// String returns the instruction as it reads, with its line.
func (in Instruction) String() string {
	return fmt.Sprintf("%s %s (line %d)", in.Cmd, in.Args, in.Line)
}

// Parse returns text's instructions in order. An instruction that
// continues past the end of text is an error.
func Parse(text string) ([]Instruction, error) {
	var all []Instruction
	var cur *Instruction
	for i, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (cur == nil && trimmed == "") {
			continue
		}
		if cur == nil {
			cmd, args, _ := strings.Cut(trimmed, " ")
			cur = &Instruction{Line: i + 1, Cmd: strings.ToUpper(cmd)}
			trimmed = args
		}
		args, more := strings.CutSuffix(trimmed, `\`)
		cur.Args = strings.TrimSpace(cur.Args + " " + strings.TrimSpace(args))
		if !more {
			all = append(all, *cur)
			cur = nil
		}
	}
	if cur != nil {
		return all, fmt.Errorf("Dockerfile line %d: instruction continues past the end", cur.Line)
	}
	return all, nil
}
