package derpregion

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// LoadSharedFile reads the region's shared state from path (a JSON object
// of SharedMeshKey, SharedCertKey and SharedCertPriv strings), creating it
// with a fresh mesh key and certificate if it does not exist. Creation is
// atomic and never replaces a file: the new state is written to a
// temporary file in the same directory and hard-linked to path, which
// fails if path exists; the loser of a race reads the winner's file. So
// processes starting at once agree. An existing file must be complete.
func LoadSharedFile(path string, now time.Time) (*Shared, error) {
	for range 3 {
		bs, err := os.ReadFile(path)
		if err == nil {
			var raw map[string]string
			if err := json.Unmarshal(bs, &raw); err != nil {
				return nil, fmt.Errorf("derpregion: mesh file %s: not a JSON object of strings", path)
			}
			data := make(map[string][]byte, len(raw))
			for k, v := range raw {
				data[k] = []byte(v)
			}
			sh, err := ParseShared(data, now)
			if err != nil {
				return nil, fmt.Errorf("mesh file %s: %w", path, err)
			}
			return sh, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("derpregion: read mesh file: %w", err)
		}
		if err := createSharedFile(path, now); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("derpregion: mesh file %s keeps disappearing", path)
}

// createSharedFile writes new shared state to path unless it exists.
func createSharedFile(path string, now time.Time) error {
	data, _, err := CompleteShared(nil, now)
	if err != nil {
		return err
	}
	raw := make(map[string]string, len(data))
	for k, v := range data {
		raw[k] = string(v)
	}
	bs, err := json.MarshalIndent(raw, "", "  ")
	if err != nil {
		return fmt.Errorf("derpregion: encode mesh file: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tsrelay-mesh-*")
	if err != nil {
		return fmt.Errorf("derpregion: create mesh file: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(bs); err != nil {
		tmp.Close()
		return fmt.Errorf("derpregion: write mesh file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("derpregion: write mesh file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("derpregion: write mesh file: %w", err)
	}
	// CreateTemp made it 0600; Link keeps that.
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("derpregion: create mesh file %s: %w", path, err)
	}
	return nil
}
