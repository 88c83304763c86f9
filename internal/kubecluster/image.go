package kubecluster

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/tsrelay/tsrelay/internal/dockerfile"
)

// Image is a single-layer container image: what a Dockerfile that starts
// FROM scratch and COPYs files in makes.
type Image struct {
	// Ref is the image's name and tag, e.g. ghcr.io/tsrelay/relay:v0.1.0.
	Ref string
	// Files are the layer's regular files; their parent directories are
	// added as root-owned 0755 directories, as COPY makes them.
	Files []ImageFile
	// User, Entrypoint, ExposedPorts (e.g. "61441/udp") and Labels are the
	// image config's.
	User         string
	Entrypoint   []string
	ExposedPorts []string
	Labels       map[string]string
}

// ImageFile is one file of an Image, owned by root.
type ImageFile struct {
	Path string // absolute, inside the image
	Mode os.FileMode
	Data []byte
}

// epoch is every file's and the image's time, so that the same contents
// make the same image.
var epoch = time.Unix(0, 0).UTC()

// WriteDockerArchive writes img as a docker-archive tar (what `docker save`
// writes: manifest.json, the config and one layer), which `ctr images
// import` reads.
func WriteDockerArchive(w io.Writer, img Image) error {
	layer, err := img.layer()
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Ref, err)
	}
	diffID := sha256.Sum256(layer)
	ports := map[string]struct{}{}
	for _, p := range img.ExposedPorts {
		ports[p] = struct{}{}
	}
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"created":      epoch,
		"config": map[string]any{
			"User":         img.User,
			"Entrypoint":   img.Entrypoint,
			"ExposedPorts": ports,
			"Labels":       img.Labels,
			"Env":          []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(diffID[:])}},
	})
	if err != nil {
		return fmt.Errorf("image %s: config: %w", img.Ref, err)
	}
	configSum := sha256.Sum256(config)
	configName := hex.EncodeToString(configSum[:]) + ".json"
	layerName := hex.EncodeToString(diffID[:]) + "/layer.tar"
	manifest, err := json.Marshal([]map[string]any{{
		"Config":   configName,
		"RepoTags": []string{img.Ref},
		"Layers":   []string{layerName},
	}})
	if err != nil {
		return fmt.Errorf("image %s: manifest: %w", img.Ref, err)
	}
	tw := tar.NewWriter(w)
	for _, f := range []struct {
		name string
		data []byte
	}{{configName, config}, {layerName, layer}, {"manifest.json", manifest}} {
		if dir := path.Dir(f.name); dir != "." {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return fmt.Errorf("image %s: %w", img.Ref, err)
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: 0o644, Size: int64(len(f.data)), ModTime: epoch}); err != nil {
			return fmt.Errorf("image %s: %w", img.Ref, err)
		}
		if _, err := tw.Write(f.data); err != nil {
			return fmt.Errorf("image %s: %w", img.Ref, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image %s: %w", img.Ref, err)
	}
	return nil
}

// layer returns the image's one layer, an uncompressed tar.
func (img Image) layer() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	files := slices.Clone(img.Files)
	slices.SortFunc(files, func(a, b ImageFile) int { return strings.Compare(a.Path, b.Path) })
	for _, f := range files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path {
			return nil, fmt.Errorf("file path %q is not a clean absolute path", f.Path)
		}
		name := strings.TrimPrefix(f.Path, "/")
		var parents []string
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for _, d := range slices.Backward(parents) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return nil, err
			}
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: int64(f.Mode.Perm()), Size: int64(len(f.Data)), ModTime: epoch}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// RelayImage builds the relay image from the checkout at root the way its
// Dockerfile does, without a container engine: it builds cmd/relay with the
// Dockerfile's go build flags (version stamped as version) into binDir, and
// reads the Dockerfile's final stage for what goes into the image: the
// files it COPYs (the relay from the build stage's /out/relay, the CA
// bundle from this machine's Debian, as the golang:…-bookworm build image
// has it), USER, EXPOSE, ENTRYPOINT and LABELs. A Dockerfile instruction it
// does not know is an error, so the image cannot silently drift from the
// Dockerfile's.
func RelayImage(ctx context.Context, root, binDir, ref, version string) (Image, error) {
	df, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		return Image{}, fmt.Errorf("relay image: %w", err)
	}
	final, err := finalStage(string(df))
	if err != nil {
		return Image{}, fmt.Errorf("relay image: Dockerfile: %w", err)
	}
	tags, err := os.ReadFile(filepath.Join(root, "cmd", "relay", "build-tags"))
	if err != nil {
		return Image{}, fmt.Errorf("relay image: %w", err)
	}
	bin := filepath.Join(binDir, "relay")
	// The Dockerfile's go build (image/dockerfile_test.go holds it to the
	// Makefile's), for this machine's architecture.
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath",
		"-tags", strings.TrimSpace(string(tags)),
		"-ldflags", "-s -w -X main.version="+version,
		"-o", bin, "./cmd/relay")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if out, err := cmd.CombinedOutput(); err != nil {
		return Image{}, fmt.Errorf("relay image: go build: %w\n%s", err, out)
	}
	// Where the COPY sources of the final stage come from here.
	sources := map[string]string{
		"/out/relay":                         bin,
		"/etc/ssl/certs/ca-certificates.crt": "/etc/ssl/certs/ca-certificates.crt",
	}
	img := Image{Ref: ref, Labels: map[string]string{}}
	vars := map[string]string{"VERSION": version}
	for _, in := range final {
		switch in.Cmd {
		case "ARG":
		case "COPY":
			f := strings.Fields(in.Args)
			if len(f) != 3 || f[0] != "--from=build" {
				return Image{}, fmt.Errorf("relay image: Dockerfile line %d: COPY %s; want COPY --from=build SRC DST", in.Line, in.Args)
			}
			src, ok := sources[f[1]]
			if !ok {
				return Image{}, fmt.Errorf("relay image: Dockerfile line %d copies %s, which this harness does not know how to make", in.Line, f[1])
			}
			data, err := os.ReadFile(src)
			if err != nil {
				return Image{}, fmt.Errorf("relay image: %w", err)
			}
			mode := os.FileMode(0o644)
			if fi, err := os.Stat(src); err == nil && fi.Mode()&0o111 != 0 {
				mode = 0o755
			}
			img.Files = append(img.Files, ImageFile{Path: f[2], Mode: mode, Data: data})
		case "USER":
			img.User = in.Args
		case "EXPOSE":
			img.ExposedPorts = append(img.ExposedPorts, strings.Fields(in.Args)...)
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.Args), &img.Entrypoint); err != nil {
				return Image{}, fmt.Errorf("relay image: Dockerfile line %d: ENTRYPOINT %s is not in exec form: %w", in.Line, in.Args, err)
			}
		case "LABEL":
			for _, m := range labelRE.FindAllStringSubmatch(in.Args, -1) {
				img.Labels[m[1]] = os.Expand(m[2], func(k string) string { return vars[k] })
			}
		default:
			return Image{}, fmt.Errorf("relay image: Dockerfile line %d: %s in the final stage, which this harness does not model", in.Line, in.Cmd)
		}
	}
	if len(img.Files) == 0 || len(img.Entrypoint) == 0 {
		return Image{}, errors.New("relay image: the Dockerfile's final stage copies nothing or has no ENTRYPOINT")
	}
	return img, nil
}

var labelRE = regexp.MustCompile(`([\w.-]+)="([^"]*)"`)

// finalStage returns the instructions after the Dockerfile's last FROM,
// which must be FROM scratch.
func finalStage(text string) ([]dockerfile.Instruction, error) {
	all, err := dockerfile.Parse(text)
	if err != nil {
		return nil, err
	}
	last := -1
	for i, in := range all {
		if in.Cmd == "FROM" {
			last = i
		}
	}
	if last < 0 {
		return nil, errors.New("no FROM")
	}
	if all[last].Args != "scratch" {
		return nil, fmt.Errorf("line %d: the final stage is FROM %s; this harness builds images FROM scratch only", all[last].Line, all[last].Args)
	}
	return all[last+1:], nil
}
