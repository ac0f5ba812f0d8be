package main

// CRDs installed before the controller manager starts.
//
// The garbage collector and the namespace controller learn about new resource types from
// discovery. The collector re-reads discovery every 30 s (hard-coded in
// kube-controller-manager), so an object owned by a custom resource created after start is
// collected up to ~45 s late (the sync, then the backoff of its retries). A CRD installed
// here, before the controller manager starts, is watched from the collector's first sync.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

const crdsPath = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

// crdFiles lists the manifest files of each path: a file, or the *.yaml, *.yml and *.json
// files of a directory (not recursive), in name order.
func crdFiles(paths []string) ([]string, error) {
	var files []string
	for _, p := range paths {
		info, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		if !info.IsDir() {
			files = append(files, p)
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			ext := strings.ToLower(filepath.Ext(e.Name()))
			if !e.IsDir() && slices.Contains([]string{".yaml", ".yml", ".json"}, ext) {
				files = append(files, filepath.Join(p, e.Name()))
			}
		}
	}
	return files, nil
}

// readCRDs decodes every document of the files; each must be a CustomResourceDefinition.
func readCRDs(files []string) ([]map[string]any, error) {
	var crds []map[string]any
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var obj map[string]any
			if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if obj == nil {
				continue // an empty document
			}
			if obj["kind"] != "CustomResourceDefinition" {
				return nil, fmt.Errorf("%s: a %v, not a CustomResourceDefinition", f, obj["kind"])
			}
			crds = append(crds, obj)
		}
	}
	return crds, nil
}

// installCRDs creates the CRDs and waits until each is Established.
func installCRDs(ctx context.Context, serverURL string, p *pkiFiles, paths []string) error {
	files, err := crdFiles(paths)
	if err != nil {
		return err
	}
	crds, err := readCRDs(files)
	if err != nil {
		return err
	}
	client, err := adminClient(p)
	if err != nil {
		return err
	}
	do := func(method, url string, body []byte) (int, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Authorization", "Bearer "+p.adminToken)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer func() { _ = resp.Body.Close() }()
		out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return resp.StatusCode, out, err
	}
	var names []string
	for _, crd := range crds {
		body, err := json.Marshal(crd)
		if err != nil {
			return err
		}
		status, out, err := do(http.MethodPost, serverURL+crdsPath, body)
		if err != nil {
			return err
		}
		if status != http.StatusCreated {
			return fmt.Errorf("creating CRD: status %d: %s", status, strings.TrimSpace(string(out)))
		}
		meta, _ := crd["metadata"].(map[string]any)
		name, _ := meta["name"].(string)
		names = append(names, name)
	}
	for _, name := range names {
		for {
			status, out, err := do(http.MethodGet, serverURL+crdsPath+"/"+name, nil)
			if err != nil {
				return err
			}
			if status == http.StatusOK && established(out) {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("CRD %s not Established: %w", name, ctx.Err())
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func established(crdJSON []byte) bool {
	var crd struct {
		Status struct {
			Conditions []struct{ Type, Status string } `json:"conditions"`
		} `json:"status"`
	}
	if json.Unmarshal(crdJSON, &crd) != nil {
		return false
	}
	for _, c := range crd.Status.Conditions {
		if c.Type == "Established" && c.Status == "True" {
			return true
		}
	}
	return false
}
