package dockerfile

import (
	"slices"
	"testing"
)

func TestParse(t *testing.T) {
	text := "# syntax=docker/dockerfile:1\nARG GO=1\n\nFROM golang AS build\nRUN a \\\n    b \\\n  # a comment inside\n    c\nFROM scratch\n"
	got, err := Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	want := []Instruction{
		{Line: 2, Cmd: "ARG", Args: "GO=1"},
		{Line: 4, Cmd: "FROM", Args: "golang AS build"},
		{Line: 5, Cmd: "RUN", Args: "a b c"},
		{Line: 9, Cmd: "FROM", Args: "scratch"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("Parse = %v, want %v", got, want)
	}
	if _, err := Parse("RUN a \\"); err == nil {
		t.Error("Parse of an unfinished continuation: no error, want one")
	}
}
