package image_test

import (
	"encoding/json"
	"go/version"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/tsrelay/tsrelay/internal/dockerfile"
)

// Debian 12 packages no Dockerfile linter (no hadolint), so these tests
// read the Dockerfile for what the image promises instead.

// instruction is one Dockerfile instruction.
type instruction = dockerfile.Instruction

// stage is one FROM and the instructions after it.
type stage struct {
	from  instruction
	instr []instruction
}

// find returns the stage's instructions named cmd.
func (s stage) find(cmd string) []instruction {
	var out []instruction
	for _, in := range s.instr {
		if in.Cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// parseDockerfile splits a Dockerfile into the instructions before the
// first FROM (global ARGs) and its stages. It knows comments, parser
// directives and backslash continuations, which is all this Dockerfile uses.
func parseDockerfile(t *testing.T, text string) (global []instruction, stages []stage) {
	t.Helper()
	all, err := dockerfile.Parse(text)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range all {
		switch {
		case in.Cmd == "FROM":
			stages = append(stages, stage{from: in})
		case len(stages) == 0:
			global = append(global, in)
		default:
			stages[len(stages)-1].instr = append(stages[len(stages)-1].instr, in)
		}
	}
	return global, stages
}

// argNames returns the names the ARG instructions declare.
func argNames(ins []instruction) map[string]string {
	names := map[string]string{}
	for _, in := range ins {
		if in.Cmd != "ARG" {
			continue
		}
		for f := range strings.FieldsSeq(in.Args) {
			name, def, _ := strings.Cut(f, "=")
			names[name] = def
		}
	}
	return names
}

func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	global, stages := parseDockerfile(t, string(b))
	if len(stages) != 2 {
		t.Fatalf("Dockerfile has %d stages, want 2: a build stage and the final image", len(stages))
	}
	build, final := stages[0], stages[1]

	// The build stage cross-compiles on the build machine's platform.
	if !strings.HasPrefix(build.from.Args, "--platform=$BUILDPLATFORM ") {
		t.Errorf("line %d: FROM %s; want FROM --platform=$BUILDPLATFORM …, to cross-compile instead of emulating", build.from.Line, build.from.Args)
	}
	// Its Go can build this module: the golang image sets GOTOOLCHAIN=local.
	goVersion := argNames(global)["GO_VERSION"]
	if !strings.Contains(build.from.Args, "golang:${GO_VERSION}") || goVersion == "" {
		t.Errorf("line %d: FROM %s; want golang:${GO_VERSION}-… with a global ARG GO_VERSION=…", build.from.Line, build.from.Args)
	}
	if want := goModGo(t); version.Compare("go"+goVersion, "go"+want) < 0 {
		t.Errorf("Dockerfile GO_VERSION=%s is older than go.mod's go %s; the build would refuse", goVersion, want)
	}
	args := argNames(build.instr)
	for _, name := range []string{"TARGETOS", "TARGETARCH", "TARGETVARIANT", "VERSION"} {
		if _, ok := args[name]; !ok {
			t.Errorf("the build stage does not declare ARG %s, so buildx's value never reaches it", name)
		}
	}
	var goBuild string
	for _, in := range build.find("RUN") {
		if strings.Contains(in.Args, "go build") {
			goBuild = in.Args
		}
	}
	// The flags TestStaticBinary builds with, and the Makefile's LDFLAGS.
	for _, want := range []string{
		"CGO_ENABLED=0", "GOOS=$TARGETOS", "GOARCH=$TARGETARCH", "GOARM=${TARGETVARIANT#v}",
		"-trimpath", `-tags "$(cat cmd/relay/build-tags)"`, `-ldflags "` + makefileLDFLAGS(t) + `"`, "./cmd/relay",
	} {
		if !strings.Contains(goBuild, want) {
			t.Errorf("the build stage's go build (%q) lacks %s", goBuild, want)
		}
	}
	if got, want := strings.Join(buildFlags(t), " "), `-trimpath -tags `+buildTags(t)+` -ldflags -s -w -X main.version=`+testVersion; got != want {
		t.Errorf("the tests build with %q, want %q like the Dockerfile", got, want)
	}

	// The final image: an empty base, the binary and the CA bundle, a
	// numeric non-root user, the binary as entrypoint.
	if final.from.Args != "scratch" {
		t.Errorf("line %d: final FROM %s, want scratch", final.from.Line, final.from.Args)
	}
	var copied []string
	for _, in := range final.instr {
		switch in.Cmd {
		case "COPY":
			f := strings.Fields(in.Args)
			if !slices.Contains(f, "--from=build") {
				t.Errorf("line %d: COPY %s; the final image takes files from the build stage only", in.Line, in.Args)
			}
			copied = append(copied, f[len(f)-1])
		case "ARG", "LABEL", "USER", "EXPOSE", "ENTRYPOINT":
		default:
			t.Errorf("line %d: %s in the final image; scratch has no shell, and the image holds only the binary and the CA bundle", in.Line, in.Cmd)
		}
	}
	slices.Sort(copied)
	if want := []string{caBundle, "/relay"}; !slices.Equal(copied, want) {
		t.Errorf("the final image gets %q, want %q", copied, want)
	}
	if u := final.find("USER"); len(u) != 1 || u[0].Args != "65532:65532" {
		t.Errorf("final image: %v, want one USER 65532:65532", u)
	}
	if e := final.find("ENTRYPOINT"); len(e) != 1 || !isExecForm(e[0].Args, "/relay") {
		t.Errorf(`final image: %v, want one ENTRYPOINT ["/relay"] (exec form: there is no shell)`, e)
	}
	if _, ok := argNames(final.instr)["VERSION"]; !ok {
		t.Errorf("the final stage does not declare ARG VERSION, so its version label is empty")
	}
	labels := map[string]string{}
	for _, in := range final.find("LABEL") {
		for _, m := range regexp.MustCompile(`([\w.-]+)="([^"]*)"`).FindAllStringSubmatch(in.Args, -1) {
			labels[m[1]] = m[2]
		}
	}
	for key, want := range map[string]string{
		"org.opencontainers.image.source":   "https://github.com/tsrelay/tsrelay",
		"org.opencontainers.image.version":  "${VERSION}",
		"org.opencontainers.image.licenses": "BSD-3-Clause",
	} {
		if got := labels[key]; got != want {
			t.Errorf("label %s = %q, want %q", key, got, want)
		}
	}
	if labels["org.opencontainers.image.description"] == "" {
		t.Errorf("no label org.opencontainers.image.description")
	}
	license, err := os.ReadFile("../LICENSE")
	if err != nil || !strings.HasPrefix(string(license), "BSD 3-Clause License") {
		t.Errorf("LICENSE is not BSD 3-Clause (err %v), but the image's licenses label says so", err)
	}
}

// isExecForm reports whether args is a JSON array holding just want.
func isExecForm(args, want string) bool {
	var argv []string
	return json.Unmarshal([]byte(args), &argv) == nil && slices.Equal(argv, []string{want})
}

// goModGo returns the version on go.mod's go line.
func goModGo(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	return string(m[1])
}

// makefileLDFLAGS returns the Makefile's LDFLAGS, with its $(VERSION)
// written as the Dockerfile writes it.
func makefileLDFLAGS(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^LDFLAGS :?= (.+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatal("the Makefile sets no LDFLAGS")
	}
	return strings.ReplaceAll(string(m[1]), "$(VERSION)", "${VERSION}")
}

// TestDockerignoreKeepsSources checks that .dockerignore leaves in the build
// context every file the relay's build reads: go.mod, go.sum and the Go and
// embedded files of each package of this module that cmd/relay imports.
func TestDockerignoreKeepsSources(t *testing.T) {
	b, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	ignore := parseDockerignore(string(b))

	cmd := exec.CommandContext(t.Context(), "go", "list", "-deps", "-f",
		`{{if and .Module .Module.Main}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}
{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}
{{end}}{{end}}`, "./cmd/relay")
	cmd.Dir = ".."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps ./cmd/relay: %v", err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	files := []string{"go.mod", "go.sum"}
	for f := range strings.FieldsSeq(string(out)) {
		rel, err := filepath.Rel(root, f)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, filepath.ToSlash(rel))
	}
	if len(files) < 4 {
		t.Fatalf("go list found only %q", files)
	}
	for _, f := range files {
		if ignore(f) {
			t.Errorf(".dockerignore leaves %s out of the build context, and the build needs it", f)
		}
	}
	for _, f := range []string{".git/config", "bin/relay", "cmd/relay/main_test.go"} {
		if !ignore(f) {
			t.Errorf(".dockerignore sends %s to the build", f)
		}
	}
}

// parseDockerignore returns a function that reports whether .dockerignore
// excludes a path (slash-separated, relative to the context). It follows
// BuildKit's rules: patterns are relative to the context root, * and ?
// stop at /, ** spans directories, a pattern that matches a directory
// matches what is in it, a leading ! re-includes, and the last matching
// pattern wins.
func parseDockerignore(text string) func(path string) bool {
	type rule struct {
		re      *regexp.Regexp
		include bool
	}
	var rules []rule
	for line := range strings.Lines(text) {
		p := strings.TrimSpace(line)
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		include := strings.HasPrefix(p, "!")
		p = strings.TrimPrefix(filepath.ToSlash(filepath.Clean(strings.TrimPrefix(p, "!"))), "/")
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(p); i++ {
			switch {
			case strings.HasPrefix(p[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(p[i:], "**"):
				re.WriteString(".*")
				i++
			case p[i] == '*':
				re.WriteString("[^/]*")
			case p[i] == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(p[i : i+1]))
			}
		}
		re.WriteString("(/.*)?$") // and everything in it
		rules = append(rules, rule{regexp.MustCompile(re.String()), include})
	}
	return func(path string) bool {
		excluded := false
		for _, r := range rules {
			if r.re.MatchString(path) {
				excluded = !r.include
			}
		}
		return excluded
	}
}
